"""Load test with locust: token users and AK/SK users with a realistic mix of images.

    .venv/bin/imagetag admin dev-credentials --json > dev.json
    IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt IMAGETAG_RATE_LIMIT_PER_S=1000 \\
        IMAGETAG_RATE_LIMIT_BURST=1000 .venv/bin/imagetag serve &
    .venv/bin/locust -f load-tests/locustfile.py --headless -u 16 -r 4 -t 60s \\
        --host http://127.0.0.1:8080 --credentials dev.json

Token users log in once (`POST /v3/auth/tokens`) and send `X-Auth-Token` to `/v1.0/image/tagging`,
like the vendor's Python sample; AK/SK users sign every request with the official SDK's signer and
call `/v2/{project_id}/image/tagging`, like the SDK. Images are the repository's photos re-encoded
into a mix of sizes and formats, weighted towards what phones and web pages send.
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path
from urllib.parse import urlparse

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from locust import FastHttpUser, between, events, task
from PIL import Image

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "photos"
# (longest side in px, format, weight): mostly phone-sized JPEGs, some thumbnails and PNG/WEBP.
MIX = [(1024, "JPEG", 5), (320, "JPEG", 2), (2048, "JPEG", 1), (800, "PNG", 1), (640, "WEBP", 1)]


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--credentials", default="dev.json", help="JSON from `imagetag admin dev-credentials --json`")
    parser.add_argument("--language", default="zh", choices=("zh", "en"))


def _bodies(language: str) -> list[tuple[str, bytes]]:
    """Request bodies prepared once, so the load generator spends its CPU on sending."""
    # Every other photo is variety enough, and keeps the start-up encoding to about a second.
    photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))[::2]]
    bodies = []
    for side, image_format, weight in MIX:
        for photo in photos:
            scale = side / max(photo.size)
            resized = photo.resize((max(16, round(photo.width * scale)), max(16, round(photo.height * scale))))
            buffer = io.BytesIO()
            resized.save(buffer, format=image_format, **({"compress_level": 1} if image_format == "PNG" else {}))
            body = json.dumps({"image": base64.b64encode(buffer.getvalue()).decode(), "language": language})
            bodies.extend([(f"{image_format.lower()} {side}px", body.encode())] * weight)
    return bodies


class _TaggingUser(FastHttpUser):
    abstract = True
    wait_time = between(0.0, 0.2)
    bodies: list[tuple[str, bytes]] = []
    credentials: dict[str, str] = {}

    def on_start(self) -> None:
        options = self.environment.parsed_options
        if not _TaggingUser.bodies:
            _TaggingUser.bodies = _bodies(options.language)
            _TaggingUser.credentials = json.loads(Path(options.credentials).read_text())

    def check(self, response) -> None:
        # An empty tag list is a valid answer (a dusky lake has nothing above threshold 60).
        if response.status_code != 200 or "result" not in response.json():
            response.failure(f"{response.status_code} {response.text[:200]}")


class TokenUser(_TaggingUser):
    """The vendor's Python sample: an IAM token, then X-Auth-Token on /v1.0."""

    def on_start(self) -> None:
        super().on_start()
        c = self.credentials
        login = {"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "domain": {"name": c["domain"]}, "name": c["user"], "password": c["password"]}}},
            "scope": {"project": {"name": c["project_name"]}}}}
        response = self.client.post("/v3/auth/tokens?nocatalog=true", json=login, name="login")
        self.token = response.headers["X-Subject-Token"]

    @task
    def tag(self) -> None:
        name, body = random.choice(self.bodies)
        headers = {"Content-Type": "application/json", "X-Auth-Token": self.token}
        with self.client.post("/v1.0/image/tagging", data=body, headers=headers,
                              name=f"token {name}", catch_response=True) as response:
            self.check(response)


class AkSkUser(_TaggingUser):
    """The official SDK's way: every request signed with SDK-HMAC-SHA256."""

    @task
    def tag(self) -> None:
        name, body = random.choice(self.bodies)
        c = self.credentials
        target = urlparse(self.host)
        request = SdkRequest(
            method="POST", schema=target.scheme, host=target.netloc, query_params=[],
            resource_path=f"/v2/{c['project_id']}/image/tagging",
            header_params={"Content-Type": "application/json;charset=utf-8", "X-Project-Id": c["project_id"]},
            body=body,
        )
        Signer(BasicCredentials(c["ak"], c["sk"])).sign(request)
        with self.client.post(request.resource_path, data=body, headers=request.header_params,
                              name=f"aksk {name}", catch_response=True) as response:
            self.check(response)
