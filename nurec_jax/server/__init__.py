"""NuRec's SensorsimService gRPC server (`app.create_server`) and the protocol helpers.

The four pose helpers NuRec's `nre.grpc.serve` offers client code are re-exported here.
"""

from nurec_jax.server.convert import grpc_pose_to_se3 as grpc_pose_to_se3
from nurec_jax.server.convert import grpc_pose_to_tquat as grpc_pose_to_tquat
from nurec_jax.server.convert import se3_to_grpc_pose as se3_to_grpc_pose
from nurec_jax.server.convert import tquat_to_grpc_pose as tquat_to_grpc_pose
