"""nurec-jax: a differentiable JAX re-implementation of NVIDIA NuRec's rendering server."""

from nurec_jax.data import sample_scene_path as sample_scene_path
from nurec_jax.errors import SceneFormatError as SceneFormatError
from nurec_jax.errors import UnsupportedSceneError as UnsupportedSceneError
from nurec_jax.metadata import CameraCalibration as CameraCalibration
from nurec_jax.metadata import FThetaIntrinsics as FThetaIntrinsics
from nurec_jax.metadata import LidarCalibration as LidarCalibration
from nurec_jax.metadata import OpenCVFisheyeIntrinsics as OpenCVFisheyeIntrinsics
from nurec_jax.metadata import OpenCVPinholeIntrinsics as OpenCVPinholeIntrinsics
from nurec_jax.metadata import RigTrajectory as RigTrajectory
from nurec_jax.metadata import SceneMetadata as SceneMetadata
from nurec_jax.metadata import ShutterType as ShutterType
from nurec_jax.metadata import Track as Track
from nurec_jax.scene import HostScene as HostScene
from nurec_jax.scene import LoadOptions as LoadOptions
from nurec_jax.scene import LoadReport as LoadReport
from nurec_jax.scene import Scene as Scene
from nurec_jax.scene import describe as describe
from nurec_jax.scene import load_host_scene as load_host_scene
from nurec_jax.scene import load_scene as load_scene
from nurec_jax.scene import put_scene as put_scene
from nurec_jax.scene import read_scene_metadata as read_scene_metadata
from nurec_jax.types import Gaussians as Gaussians
from nurec_jax.types import SceneGaussians as SceneGaussians
from nurec_jax.types import Sky as Sky

__version__ = "0.1.0"
