"""Stack config parsing and the checks that refuse unsafe or inconsistent deployments."""

from __future__ import annotations

import dataclasses

import pulumi
import pytest

from l2cache.domain.regions import DEFAULT_BATCH

from .harness import DATASETS_YAML, PCG_EDITS, config, sizing, stack_config

GIB = 1024


@pytest.fixture
def cfg(tmp_path):
    return stack_config(tmp_path)


def refused(cfg, **changes) -> str:
    with pytest.raises(config.ConfigError) as err:
        config.validate(dataclasses.replace(cfg, **changes))
    return str(err.value)


def test_worker_memory_from_the_measured_bytes_per_voxel():
    mib = sizing.worker_memory_mib((256, 256, 512))
    assert mib == 1024
    assert mib >= 1.25 * 627  # headroom over the measured peak (MiB, bench/worker.py)
    assert mib % 256 == 0
    assert sizing.worker_memory_mib((128, 128, 64)) == 512  # small chunks stay small
    with pytest.raises(sizing.SizingError, match="over Cloud Run"):
        sizing.worker_memory_mib((2048, 2048, 1024))


def test_read_ahead_adds_one_chunk_read_to_the_worker_memory():
    mib = sizing.worker_memory_mib((256, 256, 512), read_ahead=True)
    assert mib == 1280
    assert mib >= 1.25 * 822  # measured peak with read-ahead (MiB, bench/worker.py "batch")


def test_cpu_is_what_cloud_run_requires_for_the_memory():
    assert sizing.cpu_for_memory(2048) == "1"
    assert sizing.cpu_for_memory(4096) == "1"
    assert sizing.cpu_for_memory(4352) == "2"
    assert sizing.cpu_for_memory(8192 + 256) == "4"
    assert sizing.cpu_for_memory(32 * GIB) == "8"


def test_timeouts_from_measured_chunk_time_within_the_callers_deadlines():
    assert sizing.worker_timeout_s((256, 256, 512), 4) == 120  # (10 + 4 x 3.0) x 5 = 110
    assert sizing.worker_timeout_s((512, 512, 512), 4) == 290  # (10 + 4 x 12.0) x 5
    assert sizing.worker_timeout_s((64, 64, 64), 1) == sizing.MIN_TIMEOUT_S
    assert sizing.on_edit_timeout_s((256, 256, 512), 4) <= sizing.PUSH_ACK_DEADLINE_S
    with pytest.raises(sizing.SizingError, match="dispatch deadline"):
        sizing.worker_timeout_s((256, 256, 512), 64)


def test_defaults_are_consistent():
    assert sizing.DEFAULT_QUEUE_MAX_CONCURRENT <= (
        sizing.DEFAULT_WORKER_MAX_INSTANCES * sizing.WORKER_REQUESTS_PER_INSTANCE
    )
    assert sizing.DEFAULT_CHUNKS_PER_TASK == DEFAULT_BATCH  # what the CLI ingests with
    sizing.worker_timeout_s((256, 256, 512), sizing.DEFAULT_CHUNKS_PER_TASK)


def test_more_dispatches_than_worker_instances_is_refused(cfg):
    msg = refused(cfg, queue_max_concurrent=81, worker_max_instances=80)
    assert "queueMaxConcurrent=81" in msg and "workerMaxInstances=80" in msg
    config.validate(dataclasses.replace(cfg, queue_max_concurrent=80, worker_max_instances=80))
    msg = refused(cfg, queue_max_concurrent=75, edits_queue_max_concurrent=6)
    assert "editsQueueMaxConcurrent=6" in msg and "workerMaxInstances=80" in msg
    config.validate(dataclasses.replace(cfg, queue_max_concurrent=75, edits_queue_max_concurrent=5))


def test_edits_topic_must_be_a_full_path(cfg):
    assert "projects/<pcg-project>/topics/<name>" in refused(cfg, pcg_edits_topic="pcg-edits")
    config.validate(dataclasses.replace(cfg, pcg_edits_topic=PCG_EDITS))


def test_cave_auth_on_needs_the_app_to_check_tokens(cfg):
    assert "allUsers" in refused(cfg, cave_auth=True)  # the map has no auth section
    with_auth = {**cfg.datasets, "auth": {"url": "auth.example.org/auth"}}
    config.validate(dataclasses.replace(cfg, cave_auth=True, datasets=with_auth))
    assert "authTokenSecret" in refused(cfg, auth_token_secret="l2cache-auth-token")


def test_queue_attempts_must_match_the_dataset_map(cfg):
    msg = refused(cfg, queue_max_attempts=10)  # the test map says tasks.max_attempts: 7
    assert "queueMaxAttempts=10" in msg and "max_attempts=7" in msg
    short = {**cfg.datasets, "tasks": {**cfg.datasets["tasks"], "attempt_deadline_s": 60}}
    assert "attempt_deadline_s=60" in refused(cfg, datasets=short)


def test_other_refusals(cfg):
    assert "loadBalancingScheme" in refused(cfg, lb_scheme="INTERNAL")
    assert "lookupIngress" in refused(cfg, lookup_ingress="EVERYONE")
    assert "ALLOW_INTERNAL_AND_GCLB" in refused(
        cfg, lookup_backend=True, lookup_ingress="ALLOW_INTERNAL_ONLY"
    )
    assert "l2cache_nope" in refused(cfg, existing_cache_tables=frozenset({"l2cache_nope"}))
    assert "maxChunksPerTask" in refused(cfg, chunks_per_task=64)


def test_parse_cave_auth_and_edits_topic():
    with_auth = {"auth": {"url": "auth.example.org/auth"}}
    assert config.parse_cave_auth(None, {}) is False
    assert config.parse_cave_auth(None, {"auth": {}}) is False
    assert config.parse_cave_auth(None, with_auth) is True  # what the app enforces
    assert config.parse_cave_auth("false", with_auth) is False  # IAM in front as well
    assert config.parse_cave_auth("true", {}) is True  # refused by validate (see above)
    with pytest.raises(config.ConfigError):
        config.parse_cave_auth("https://x.org/auth", {})
    assert config.edits_topic_path(PCG_EDITS, {}) == PCG_EDITS
    bare = {"pubsub": {"edits_topic": "pcg-edits"}}
    assert config.edits_topic_path(None, bare) is None  # a bare name says nothing of the project
    bare["pubsub"]["edits_project"] = "pcg-project"
    assert config.edits_topic_path(None, bare) == PCG_EDITS
    assert config.edits_topic_path(None, {"pubsub": {"edits_topic": PCG_EDITS}}) == PCG_EDITS


@pytest.fixture
def stack_settings(tmp_path):
    """Set Pulumi stack config keys for ``config.load`` and restore the previous ones."""
    saved = dict(pulumi.runtime.config.CONFIG.get())
    path = tmp_path / "datasets.yaml"
    path.write_text(DATASETS_YAML)

    def apply(**keys):
        base = {"gcp:project": "proj", "l2cache:datasetsFile": str(path)}
        pulumi.runtime.config.set_all_config({**base, **keys})

    yield apply
    pulumi.runtime.config.set_all_config(saved)


def test_load_reads_the_new_keys(stack_settings):
    stack_settings(
        **{
            "l2cache:caveAuth": "false",
            "l2cache:authTokenSecret": "",
            "l2cache:pcgEditsTopic": PCG_EDITS,
            "l2cache:existingCacheTables": '["l2cache_minnie_v1"]',
            "l2cache:existingBigtableInstance": "true",
            "l2cache:lookupDomain": "l2.example.org",
            "l2cache:loadBalancingScheme": "EXTERNAL",
            "l2cache:urlMap": "cave-https",
            "l2cache:maxChunksPerTask": "2",
        }
    )
    got = config.load()
    assert got.cave_auth is False and got.auth_token_secret is None
    assert got.queue_max_attempts == 7  # from the dataset map's tasks.max_attempts
    assert got.pcg_edits_topic == PCG_EDITS
    assert got.existing_cache_tables == frozenset({"l2cache_minnie_v1"})
    assert got.is_existing_table("minnie") and not got.is_existing_table("pinky")
    assert got.existing_bigtable_instance
    assert got.routed and got.ingress == "ALLOW_INTERNAL_AND_GCLB"
    assert (got.lb_scheme, got.url_map, got.chunks_per_task) == ("EXTERNAL", "cave-https", 2)


def test_load_defaults_are_deployable_and_refuses_oversubscription(stack_settings):
    stack_settings()
    got = config.load()
    # derived (l2cache_ops.sizing): 10 % of the 50 instances kept for the edits queue,
    # the bulk queue's rate from the map's largest dataset (512 chunks: the 20/s floor)
    assert (got.worker_max_instances, got.queue_max_concurrent, got.edits_max_concurrent) == (
        50,
        45,
        5,
    )
    assert got.queue_max_per_second == 20.0 and got.dataset_chunks == 512
    stack_settings(**{"l2cache:datasetChunks": "11600000"})  # minnie65: Cloud Tasks' cap
    got = config.load()
    assert got.queue_max_per_second == 500.0 and got.dataset_chunks == 11_600_000
    assert got.dispatch_plan().dispatch_s <= 3 * 3600
    assert not got.cave_auth and not got.routed and got.ingress == "ALLOW_ALL"
    assert got.pcg_edits_topic is None  # the map's bare "pcg-edits" names no project
    stack_settings(**{"l2cache:queueMaxConcurrent": "100"})
    with pytest.raises(config.ConfigError, match="workerMaxInstances=50"):
        config.load()
    stack_settings(**{"l2cache:queueMaxAttempts": "3"})
    with pytest.raises(config.ConfigError, match="tasks.max_attempts=7"):
        config.load()


def test_load_follows_the_dataset_maps_auth_section(stack_settings, tmp_path):
    path = tmp_path / "with-auth.yaml"
    path.write_text("auth: {url: auth.example.org/auth}\n" + DATASETS_YAML)
    stack_settings(
        **{"l2cache:datasetsFile": str(path), "l2cache:authTokenSecret": "l2cache-auth-token"}
    )
    got = config.load()
    assert got.cave_auth and got.auth_token_secret == "l2cache-auth-token"
    stack_settings(**{"l2cache:caveAuth": "true"})  # stated, but the map has no auth
    with pytest.raises(config.ConfigError, match="no auth section"):
        config.load()
