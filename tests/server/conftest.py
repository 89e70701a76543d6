import pytest

from thin_scene import write_thin_scene


@pytest.fixture(scope="session")
def thin_scene(tmp_path_factory):
    """A light copy of the sample scene (scene id `thin-street`) in its own directory."""
    d = tmp_path_factory.mktemp("scenes")
    return write_thin_scene(d / "thin.usdz", keep_every=25, scene_id="thin-street")
