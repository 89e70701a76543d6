"""Numerical constants shared by the reference renderer, the Pallas kernels and the tests.

Values follow NuRec's 3DGUT configuration (docs/rendering.md#constants).
"""

# Compositing (gsplat / 3DGUT / NuRec).
ALPHA_THRESHOLD = 1.0 / 255.0  # a Gaussian with alpha below this is skipped
MAX_ALPHA = 0.99  # alpha clamp; keeps 1 / (1 - alpha) <= 100 in backward passes
TRANSMITTANCE_THRESHOLD = 1e-4  # a pixel stops once T would fall to or below this (exclusive)
MIN_KERNEL_RESPONSE = 0.0113  # density_kernel_min_response ~ exp(-4.5): the 3-sigma contour

# Unscented transform (NuRec: alpha 1, beta 2, kappa 0).
UT_ALPHA = 1.0
UT_BETA = 2.0
UT_KAPPA = 0.0
UT_IMAGE_MARGIN = 0.1  # sigma points within 10 % outside the image still count as valid

# Footprint used for tile selection only (eval3d decides the composited alpha).
COVARIANCE_DILATION = 0.3  # px^2 added to the projected covariance
MAX_EXTENT_SIGMA = 3.33  # opacity-aware extent is capped at 3.33 sigma
NEAR_CLIP = 0.2  # metres: Gaussian means closer than this (camera z or distance) are culled
DEPTH_KEY_FAR = 1e5  # metres: far end of the log-depth range packed into sort keys

# Kernel block sizes and capacities (the options' defaults; BUILD_NOTES, Renderer, for the measurements).
TILE_SIZE = 16  # the Pallas (GPU) kernels' tile side
REFERENCE_TILE_SIZE = 8  # the plain-jnp compositor's (its cost is pairs x pixels per tile)
LIDAR_TILE_SIZE = 8  # rays per lidar tile side (beams x columns)
COMPOSITE_CHUNK = 16  # Gaussians per unit of a tile's list (per batch in the Pallas kernel)
COMPOSITE_UNITS_PER_STEP = 64  # units composited side by side per step of the reference compositor
PAIR_CAPACITY = 1 << 18  # default (tile, Gaussian) pair buffer of a render or lidar pass
FIRST_PAIR_CAPACITY = 1 << 16  # the Renderer's smallest first bucket
MAX_PAIR_CAPACITY = 1 << 26  # a frame or pass needing more pairs is refused (MemoryError)
FIRST_PAIRS_PER_GAUSSIAN = 4.0  # the Renderer's first bucket: pairs per Gaussian at 640x360, 8x8 tiles
ROLLING_SHUTTER_ITERATIONS = 5
LIDAR_SWEEP_ITERATIONS = 3  # fixed-point iterations for the time a lidar's sweep passes a Gaussian
