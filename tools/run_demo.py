"""`make demo`: serve the bundled sample scene, render a few frames of two cameras and a lidar
spins through the gRPC API with render-grpc, shut the server down and say where the images are.

    python tools/run_demo.py [--output-dir out/demo] [--height 180] [--frame-step 30]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading

from nurec_jax import data

CAMERAS = "camera_front_wide_120fov,camera_rear_pinhole_70fov"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="out/demo")
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--frame-step", type=int, default=30)
    parser.add_argument("--lidar-frame-step", type=int, default=120)
    args = parser.parse_args()
    scene = data.sample_scene_path()
    server = subprocess.Popen(
        [sys.executable, "-m", "nurec_jax.cli.serve_grpc", f"--artifact-glob={scene}", "--host=127.0.0.1",
         "--port=0", "--test-scenes-are-valid", "--enable-editing-actors"],
        stdout=subprocess.PIPE, text=True)
    port = {}

    def watch():
        for line in server.stdout:
            sys.stdout.write(line)
            m = re.search(r"listening on [\d.]+:(\d+)", line)
            if m:
                port["port"] = int(m.group(1))
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    t.join(300)
    if "port" not in port:
        server.kill()
        print("demo: serve-grpc did not start", file=sys.stderr)
        return 1
    try:
        rc = subprocess.call([
            sys.executable, "-m", "nurec_jax.cli.render_grpc", f"--artifact-path={scene}",
            f"--output-dir={args.output_dir}", "--host=127.0.0.1", f"--port={port['port']}",
            f"--height={args.height}", f"--camera-id={CAMERAS}", f"--frame-step={args.frame_step}",
            "--image-format=png", "--lidar", f"--lidar-frame-step={args.lidar_frame_step}",
            "--shutdown-server-on-completion"])
        server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=60)
    if rc == 0:
        print(f"demo: images and animations in {os.path.abspath(args.output_dir)}/ "
              f"(one folder per camera and per lidar: images, <camera>.gif, spins as .ply + _bev.png)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
