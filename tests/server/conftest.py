import functools
import http.server
import threading

import pytest

from tools.thin_scene import write_thin_scene


@pytest.fixture(scope="session")
def thin_scene(tmp_path_factory):
    """A light copy of the sample scene (scene id `thin-street`) in its own directory."""
    d = tmp_path_factory.mktemp("scenes")
    return write_thin_scene(d / "thin.usdz", keep_every=25, scene_id="thin-street")


@pytest.fixture
def http_dir(tmp_path):
    """Serves tmp_path/www over HTTP on 127.0.0.1; yields (dir, base url)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
