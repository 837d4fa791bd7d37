# Run as `python -c <this> weights fetch NAME --dir DIR`: the fetch initContainer on the
# persistent cache. `imagetag weights fetch` always downloads, so a file already in DIR is checked
# here first, against the same manifest entry the CLI would verify a download with (size and
# sha256 of the saved file); only a missing or failing file is fetched again, by the CLI itself.
import hashlib
import os
import sys

from service.settings import Settings
from service.weights import read_manifest

args = sys.argv[1:]
name, directory = args[2], args[4]
entry = read_manifest(Settings().weights_manifest).get(name)
if entry is not None:
    sha256, size = (entry.file_sha256, entry.file_size) if entry.archive_member else (entry.sha256, entry.size)
    path = os.path.join(directory, entry.file)
    if sha256 and os.path.isfile(path) and size in (None, os.path.getsize(path)):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() == sha256:
            print(f"{path} verified in the cache (sha256 {sha256}); not fetched again")
            sys.exit(0)
        print(f"{path} does not match the manifest; fetching it again", file=sys.stderr)
os.execvp("imagetag", ["imagetag", *args])
