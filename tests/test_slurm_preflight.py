"""Cluster pre-flight on captured `sinfo` output (fast): every limit, the fix it names, `auto` CPUs."""

from __future__ import annotations

import pytest

from launcher.backends.slurm_preflight import (
    PreflightProblem,
    Request,
    check_request,
    parse_gpus,
    parse_sinfo,
    parse_time_limit_min,
)

# `sinfo --noheader --Node --format=%P|%N|%c|%m|%G|%l|%s` on the test cluster (tests/slurm/cluster.sh).
TEST_CLUSTER = """\
low*|node1|2|8000|gpu:2|infinite|1-infinite
high|node1|2|8000|gpu:2|infinite|1-infinite
low*|node2|2|8000|gpu:2|infinite|1-infinite
high|node2|2|8000|gpu:2|infinite|1-infinite
"""
# A site with typed GPUs, socket bindings, time and size limits, a CPU-only partition and a mixed one.
SITE = """\
gpu*|g001|64|512000|gpu:a100:4(S:0-1)|2-00:00:00|1-8
gpu*|g002|64|512000|gpu:a100:4(S:0-1)|2-00:00:00|1-8
gpu*|g003|32|256000|gpu:a100:4(S:0-1)|2-00:00:00|1-8
debug|g003|32|256000|gpu:a100:4(S:0-1)|30:00|1-1
cpu|c001|128|256000|(null)|7-00:00:00|1-infinite
mixed|m001|48|384000|gpu:v100:2,gpu:t4:2|4:00:00|1-infinite
mixed|m002|48|384000|gpu:v100:2|4:00:00|1-infinite
"""


def request(**kw: object) -> Request:
    base: dict[str, object] = {
        "nodes": 1,
        "gpus_per_node": 1,
        "cpus_per_task": None,
        "mem_gb": None,
        "time_min": 60,
        "partition": None,
    }
    base.update(kw)
    return Request(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("infinite", None),
        ("UNLIMITED", None),
        ("30:00", 30),
        ("4:00:00", 240),
        ("2-00:00:00", 2880),
        ("1-12", 2160),
        ("0:30:30", 31),
        ("45", 45),
    ],
)
def test_parse_time_limit(text: str, minutes: int | None) -> None:
    assert parse_time_limit_min(text) == minutes


@pytest.mark.parametrize(
    ("gres", "gpus"),
    [("gpu:2", 2), ("gpu:a100:4(S:0-1)", 4), ("gpu:v100:2,gpu:t4:2", 4), ("(null)", 0), ("shard:8", 0)],
)
def test_parse_gpus(gres: str, gpus: int) -> None:
    assert parse_gpus(gres) == gpus


def test_parse_sinfo_partitions_and_default() -> None:
    parts = parse_sinfo(SITE)
    assert list(parts) == ["gpu", "debug", "cpu", "mixed"]
    assert parts["gpu"].default and not parts["debug"].default
    assert (parts["debug"].time_limit_min, parts["debug"].max_nodes) == (30, 1)
    assert parts["cpu"].max_nodes is None and parts["cpu"].nodes[0].gpus == 0
    assert [n.gpus for n in parts["mixed"].nodes] == [4, 2]


def test_demo_on_the_test_cluster_gets_one_cpu_per_gpu() -> None:
    """The demo's shapes on 2-CPU nodes with 2 GPUs: auto gives 1 CPU per rank; 4 (the old default)
    is refused with the fix instead of sbatch's "Requested node configuration is not available"."""
    parts = parse_sinfo(TEST_CLUSTER)
    assert check_request(request(gpus_per_node=1), parts) == 1
    assert check_request(request(gpus_per_node=2), parts) == 1
    assert check_request(request(nodes=2, gpus_per_node=2, partition="high"), parts) == 1
    with pytest.raises(PreflightProblem) as info:
        check_request(request(gpus_per_node=2, cpus_per_task=4), parts)
    message = str(info.value)
    assert "cluster.cpus_per_task: 2 task(s) x 4 CPUs = 8 CPUs per node" in message
    assert "at most 2; set cluster.cpus_per_task <= 1, or auto" in message


@pytest.mark.parametrize(
    ("kw", "fragments"),
    [
        ({"partition": "gpus"}, ["'gpus' is not a partition", "did you mean gpu?", "partitions: gpu, debug"]),
        ({"gpus_per_node": 8}, ["resources.gpus_per_node: 8 GPUs per node", "at most 4", "<= 4"]),
        ({"nodes": 4, "gpus_per_node": 4}, ["resources.nodes: 4 nodes, but partition gpu has 3"]),
        ({"nodes": 9}, ["over partition gpu's maximum job size of 8 nodes"]),
        ({"mem_gb": 600}, ["cluster.mem_gb: 600 GB per node", "at most 512000 MB", "cluster.mem_gb <= 500"]),
        ({"time_min": 3000}, ["cluster.time_min: 3000 min is over partition gpu's time limit of 2880"]),
        ({"partition": "debug", "time_min": 60}, ["time limit of 30 min", "cluster.time_min <= 30"]),
        ({"partition": "cpu"}, ["choose a partition with GPUs"]),
        ({"gpus_per_node": 4, "cpus_per_task": 32}, ["4 task(s) x 32 CPUs = 128", "cpus_per_task <= 16"]),
        (
            {"nodes": 3, "gpus_per_node": 4, "cpus_per_task": 16},  # g003 has 32 CPUs: two nodes qualify
            ["64 CPUs per node", "cpus_per_task <= 16"],
        ),
    ],
)
def test_requests_the_site_cannot_run(kw: dict[str, object], fragments: list[str]) -> None:
    with pytest.raises(PreflightProblem) as info:
        check_request(request(**kw), parse_sinfo(SITE))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_auto_cpus_per_gpu_on_the_site() -> None:
    parts = parse_sinfo(SITE)
    # The smallest per-GPU share of the nodes that could host the request (CPUs / GPUs of each node).
    assert check_request(request(), parts) == 8  # g003: 32 CPUs / 4 GPUs
    assert check_request(request(mem_gb=300), parts) == 16  # g001, g002: 64 / 4 (g003 has 250 GB)
    assert check_request(request(partition="mixed", gpus_per_node=2), parts) == 12  # m001: 48 / 4
    assert check_request(request(partition="mixed", gpus_per_node=3), parts) == 12  # only m001 has 3
    assert check_request(request(gpus_per_node=4, cpus_per_task=16, mem_gb=500), parts) == 16


def test_a_partition_list_needs_one_partition_that_can_run_it() -> None:
    parts = parse_sinfo(SITE)
    assert check_request(request(partition="debug,gpu", time_min=120), parts) == 8
    with pytest.raises(PreflightProblem, match=r"partition debug.*partition mixed"):
        check_request(request(partition="debug,mixed", time_min=600), parts)


def test_no_default_partition() -> None:
    parts = parse_sinfo(SITE.replace("gpu*", "gpu"))
    with pytest.raises(PreflightProblem, match="no default partition; choose one of: gpu, debug"):
        check_request(request(), parts)
