import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import PHOTOS


@pytest.fixture(scope="session")
def files_server(tmp_path_factory):
    """Serves the photos, plus a few generated files, on loopback for `url` requests."""
    root = tmp_path_factory.mktemp("files")
    for photo in PHOTOS.glob("*.jpg"):
        (root / photo.name).write_bytes(photo.read_bytes())
    (root / "notes.txt").write_text("not an image")
    (root / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 1024 * 1024))
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A client that stops reading at its size cap resets the connection: expected, not news.
    httpd.handle_error = lambda request, client_address: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
