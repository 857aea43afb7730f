"""Sensors and schedules with real Dagster instances: DFT results folder, surrogate registry, weekly re-screen."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from assets.dft import dft_results, discoveries
from assets.registry import registered_surrogates, registry_version, surrogate_registry
from lib.store import TableStore
from orchestration import schedules, sensors
from orchestration.jobs import DFT_INGEST_JOB
from orchestration.resources import CgwganHome, DftResource, SurrogateRegistryResource
from orchestration.schedules import weekly_rescreen
from orchestration.sensors import dft_ingest_request, make_dft_results_sensor, make_surrogate_registry_sensor

pytestmark = pytest.mark.filterwarnings("ignore")
MP = "M3GNet-MP-2021.2.8-PES"
MATPES = "M3GNet-MatPES-PBE-v2025.1-PES"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


def test_sensors_and_schedule_are_registered() -> None:
    assert {s.name for s in sensors.SENSORS} == {"dft_results_sensor", "surrogate_registry_sensor"}
    assert [s.name for s in schedules.SCHEDULES] == ["weekly_rescreen"]
    assert schedules.SCHEDULES[0].cron_schedule == "0 3 * * 1"


def test_dft_results_sensor_requests_each_folder_once_and_the_run_ingests(
        home: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    cg = CgwganHome(home=str(home))
    results = home / "dft" / "results"
    _copy(fixtures_dir / "Si", results / "Si")
    (results / "still-copying").mkdir()
    (results / "still-copying" / "INCAR").write_text("ENCUT = 520\n")  # no outputs yet: not ready
    _copy(fixtures_dir / "Si", tmp_path / "outside")
    (results / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    sensor = make_dft_results_sensor(settle_seconds=0)
    resources = {"cgwgan_home": cg, "dft": DftResource()}

    r1 = sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert len(r1.run_requests) == 1
    req = r1.run_requests[0]
    assert req.run_config["ops"]["dft_results"]["config"]["run_names"] == ["Si", "escape"]
    r2 = sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=r1.cursor))
    assert not r2.run_requests and "0 new to ingest, 0 retried" in r2.skip_reason.skip_message

    # the requested run, executed for real
    defs = dg.Definitions(assets=[dft_results, discoveries], jobs=[DFT_INGEST_JOB], resources=resources)
    run = defs.resolve_job_def("dft_ingest").execute_in_process(run_config=req.run_config, instance=instance)
    assert run.success
    rows = {r["run_name"]: r for r in TableStore(home).read("dft_results").to_dicts()}
    assert rows["Si"]["status"] == "unlinked" and rows["Si"]["min_frequency_thz"] > -0.1
    assert rows["escape"]["status"] == "refused"

    # after the retry period: ingested folders are confirmed from the store; a request whose run
    # never landed (here: never launched) is made again, under a new run key
    _copy(fixtures_dir / "Si", results / "Si-lost")
    lost, cur, _ = dft_ingest_request(cg, r2.cursor, settle_seconds=0)
    assert lost.run_config["ops"]["dft_results"]["config"]["run_names"] == ["Si-lost"]
    later = time.time() + 4000
    again, cur2, line = dft_ingest_request(cg, cur, settle_seconds=0, now=later)
    assert again.run_config["ops"]["dft_results"]["config"]["run_names"] == ["Si-lost"]
    assert again.run_key != lost.run_key and "1 retried" in line
    confirmed = json.loads(cur2)
    assert confirmed["Si"][2] is True and confirmed["escape"][2] is True and confirmed["Si-lost"][2] is False
    shutil.rmtree(results / "Si-lost")

    # a folder that finishes later, and a folder that changes, are requested on the next tick only
    (results / "still-copying" / "FORCE_CONSTANTS").write_text("garbage\n")
    (results / "Si" / "OUTCAR").write_text("truncated OUTCAR\n")
    r3 = sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=r2.cursor))
    assert r3.run_requests[0].run_config["ops"]["dft_results"]["config"]["run_names"] == ["Si", "still-copying"]
    assert r3.run_requests[0].run_key != req.run_key

    # settling: a folder written just now is not ready under a 1-hour settle time
    slow = make_dft_results_sensor(name="slow", settle_seconds=3600)
    r4 = slow(dg.build_sensor_context(instance=instance, resources=resources))
    assert [r.run_config["ops"]["dft_results"]["config"]["run_names"] for r in r4.run_requests] == [["escape"]]
    old = time.time() - 7200
    for p in (results / "Si").rglob("*"):
        os.utime(p, (old, old))
    r5 = slow(dg.build_sensor_context(instance=instance, resources=resources, cursor=r4.cursor))
    assert r5.run_requests[0].run_config["ops"]["dft_results"]["config"]["run_names"] == ["Si"]


def test_dft_results_sensor_skips_an_unreadable_folder_and_fails_on_a_bug(home: Path, tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    sensor = make_dft_results_sensor(settle_seconds=0)
    not_a_folder = tmp_path / "results.txt"
    not_a_folder.write_text("not a folder\n")
    bad = {"cgwgan_home": CgwganHome(home=str(home)), "dft": DftResource(results_dir=str(not_a_folder))}
    res = sensor(dg.build_sensor_context(instance=instance, resources=bad))
    assert isinstance(res, dg.SkipReason)
    assert "results folder unreadable" in res.skip_message and "results.txt" in res.skip_message
    # a cursor the sensor cannot have written is a bug, not bad input: the tick fails visibly
    good = {"cgwgan_home": CgwganHome(home=str(home)), "dft": DftResource()}
    with pytest.raises(json.JSONDecodeError):
        sensor(dg.build_sensor_context(instance=instance, resources=good, cursor="{not json"))


def _registry(path: Path, names: list[str]) -> None:
    path.write_text(json.dumps({"surrogates": [{"name": n, "kind": "m3gnet"} for n in names]}))


def _fixture_store(home: Path) -> TableStore:
    """The registry sensor reads only which partitions exist and their versions: its fixture
    tables hold the few columns that matter, written without the pipeline's contracts."""
    return TableStore(home, contracts={})


def _shortlist(store: TableStore, surrogate: str, ids: list[str]) -> None:
    store.write("shortlist", pl.DataFrame({
        "rank": list(range(1, len(ids) + 1)), "candidate_id": ids, "surrogate_name": [surrogate] * len(ids),
        "surrogate_sha256": ["x" * 64] * len(ids), "is_dynamically_stable": [True] * len(ids)}),
        partition=f"Ba-O-Ru|{surrogate}")


def test_registering_a_surrogate_adds_partitions_and_requests_rescreening(
        home: Path, m3gnet_dir: Path, tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:  # persistent (temporary): schedules need one
        _registration_flow(instance, home, m3gnet_dir, tmp_path)


def _registration_flow(instance: dg.DagsterInstance, home: Path, m3gnet_dir: Path, tmp_path: Path) -> None:
    store = _fixture_store(home)
    reg = tmp_path / "surrogates.json"
    _registry(reg, [MP])
    resources = {"cgwgan_home": CgwganHome(home=str(home)),
                 "surrogate_registry": SurrogateRegistryResource(registry_path=str(reg), models_dir=str(m3gnet_dir))}
    sensor = make_surrogate_registry_sensor()

    def tick(cursor):
        res = sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor))
        for req in res.dynamic_partitions_requests or []:  # what the daemon does with them
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        return res

    r0 = tick(None)  # no candidates yet: partitions are added, nothing is screened
    assert not r0.run_requests and instance.get_dynamic_partitions("surrogate") == [MP]
    r0 = tick(r0.cursor)
    assert not r0.run_requests and "no candidates_dedup yet for Ba-O-Ru" in r0.skip_reason.skip_message
    store.write("candidates_dedup", pl.DataFrame({"candidate_id": ["c1", "c2", "c3"]}), partition="Ba-O-Ru")
    r1 = tick(r0.cursor)
    assert [str(r.partition_key) for r in r1.run_requests] == [f"Ba-O-Ru|{MP}"]
    assert {r.job_name for r in r1.run_requests} == {"rescreen_surrogate"}
    assert instance.get_dynamic_partitions("surrogate") == [MP]
    assert instance.get_dynamic_partitions("chemical_system") == ["Ba-O-Ru"]
    r2 = tick(r1.cursor)
    assert not r2.run_requests and "nothing new" in r2.skip_reason.skip_message

    # register the newer surrogate next to it: a registry entry (its folder is already there)
    _registry(reg, [MP, MATPES])
    r3 = tick(r2.cursor)
    assert [str(r.partition_key) for r in r3.run_requests] == [f"Ba-O-Ru|{MATPES}"]
    assert r3.run_requests[0].tags["cgwgan/surrogate_sha256"].startswith("9f710eac")
    assert sorted(instance.get_dynamic_partitions("surrogate")) == [MP, MATPES]

    # once both shortlists exist, one churn run; again only when a shortlist changes
    _shortlist(store, MP, ["c1", "c2", "c3"])
    _shortlist(store, MATPES, ["c2", "c1", "c3"])
    r4 = tick(r3.cursor)
    assert [r.job_name for r in r4.run_requests] == ["surrogate_churn_job"]
    assert not tick(r4.cursor).run_requests
    _shortlist(store, MATPES, ["c3", "c1", "c2"])
    r6 = tick(r4.cursor)
    assert [r.job_name for r in r6.run_requests] == ["surrogate_churn_job"]
    assert r6.run_requests[0].run_key != r4.run_requests[0].run_key

    # the weekly schedule re-screens every (system, surrogate) partition
    monday = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=monday,  # exited: resources torn down
                                   resources={"cgwgan_home": resources["cgwgan_home"]}) as sched_ctx:
        sched = weekly_rescreen(sched_ctx)
    assert {r.run_key.split(":")[0] for r in sched} == {"weekly-2026-11-30"}
    assert sorted(str(r.partition_key) for r in sched) == [f"Ba-O-Ru|{MP}", f"Ba-O-Ru|{MATPES}"]
    # no screening recorded for Ba-O-Ru in this fixture store: the demo profile's sizes, phonons capped
    ops = sched[0].run_config["ops"]
    assert (ops["prescreen"]["config"]["max_candidates"], ops["relaxed"]["config"]["top_k"],
            ops["phonons"]["config"]["top_n"]) == (400, 8, 3)
    assert ops["phonons"]["config"]["max_supercell_atoms"] == schedules.DEFAULT_MAX_SUPERCELL_ATOMS
    assert sched[0].tags["cgwgan/sizes_from"] == "profile 'demo'"


def test_registry_sensor_skips_bad_input_and_fails_on_a_bug(home: Path, m3gnet_dir: Path, tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        _bad_input(instance, home, m3gnet_dir, tmp_path)


def _bad_input(instance: dg.DagsterInstance, home: Path, m3gnet_dir: Path, tmp_path: Path) -> None:
    sensor = make_surrogate_registry_sensor()
    cg = CgwganHome(home=str(home))
    none = sensor(dg.build_sensor_context(instance=instance, resources={
        "cgwgan_home": cg, "surrogate_registry": SurrogateRegistryResource(models_dir=str(m3gnet_dir))}))
    assert not none.run_requests and "no surrogate registry file" in none.skip_reason.skip_message
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    res = sensor(dg.build_sensor_context(instance=instance, resources={
        "cgwgan_home": cg, "surrogate_registry": SurrogateRegistryResource(registry_path=str(broken))}))
    assert not res.run_requests and "broken.json" in res.skip_reason.skip_message
    assert "not valid JSON" in res.skip_reason.skip_message
    bad_entry = tmp_path / "bad_entry.json"
    bad_entry.write_text(json.dumps({"surrogates": [{"name": "x", "kind": "not-a-kind"}]}))
    res = sensor(dg.build_sensor_context(instance=instance, resources={
        "cgwgan_home": cg, "surrogate_registry": SurrogateRegistryResource(registry_path=str(bad_entry))}))
    assert not res.run_requests and instance.get_dynamic_partitions("surrogate") == []
    for req in res.dynamic_partitions_requests or []:  # what the daemon does with them
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    # a malformed entry is skipped, not the file: the tick's text names the entry and the reason
    res = sensor(dg.build_sensor_context(instance=instance, cursor=res.cursor, resources={
        "cgwgan_home": cg, "surrogate_registry": SurrogateRegistryResource(registry_path=str(bad_entry))}))
    assert not res.run_requests and "bad_entry.json entry 0 ('x'): needs a 'name' and a 'kind'" in (
        res.skip_reason.skip_message)
    # a cursor the sensor cannot have written is a bug, not bad input: the tick fails visibly
    with pytest.raises(json.JSONDecodeError):
        sensor(dg.build_sensor_context(instance=instance, cursor="{not json", resources={
            "cgwgan_home": cg, "surrogate_registry": SurrogateRegistryResource(registry_path=str(broken))}))
    # registered but without weights here: listed, not screened
    reg = tmp_path / "reg.json"
    _registry(reg, [MATPES])
    res = sensor(dg.build_sensor_context(instance=instance, resources={
        "cgwgan_home": cg, "surrogate_registry": SurrogateRegistryResource(registry_path=str(reg),
                                                                           models_dir=str(tmp_path))}))
    assert not res.run_requests
    assert instance.get_dynamic_partitions("surrogate") == []
    with dg.build_schedule_context(instance=instance, resources={"cgwgan_home": cg}) as sched_ctx:
        assert weekly_rescreen(sched_ctx).skip_message


def test_registry_observation_data_version_is_the_weights_hash(m3gnet_dir: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg.json"
    _registry(reg, [MP])
    one, _ = registered_surrogates(str(reg), str(m3gnet_dir))
    _registry(reg, [MP, MATPES])
    two, _ = registered_surrogates(str(reg), str(m3gnet_dir))
    assert registry_version(one) != registry_version(two)
    resource = SurrogateRegistryResource(registry_path=str(reg), models_dir=str(m3gnet_dir))
    defs = dg.Definitions(assets=[surrogate_registry], jobs=[dg.define_asset_job("observe_registry",
                                                                                 selection=[surrogate_registry])],
                          resources={"surrogate_registry": resource})
    instance = dg.DagsterInstance.ephemeral()
    run = defs.resolve_job_def("observe_registry").execute_in_process(instance=instance)
    assert run.success
    obs = [e for e in run.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    assert obs[0].event_specific_data.asset_observation.tags["dagster/data_version"] == registry_version(two)
    assert two[MP].sha256.startswith("a9aa7237") and two[MATPES].sha256.startswith("9f710eac")


@pytest.mark.slow
def test_new_surrogate_rescreens_ba_ru_o_through_the_sensor_and_churn_compares(
        home: Path, m3gnet_dir: Path, ba_ru_o_dir: Path, tmp_path: Path) -> None:
    """Done-when of issue 6: registering M3GNet-MatPES next to M3GNet-MP re-screens a small Ba–Ru–O
    shortlist through the sensor's run requests alone, and the churn report shows both rankings."""
    import torch

    from assets.dft import surrogate_churn
    from assets.screening import phonons, prescreen, references, relaxed, shortlist
    from orchestration.jobs import CHURN_JOB, RESCREEN_JOB
    from orchestration.resources import RayResource
    from tests.lib.test_screening import ba_ru_o_candidates

    torch.set_num_threads(1)
    store = TableStore(home)
    cands = ba_ru_o_candidates().with_columns(pl.lit(1).alias("n_folded"), pl.lit(False).alias("is_known_in_mp"),
                                              pl.lit(None, pl.String).alias("mp_material_id"))
    _fixture_store(home).write("candidates_dedup", cands, partition="Ba-O-Ru")  # the screening's input only
    mp = pl.read_csv(ba_ru_o_dir / "ba_ru_o_mp_structures.csv", infer_schema_length=0)
    csv = tmp_path / "ba_ru_o_small.csv"
    mp.filter(pl.col("material_id").is_in(["mp-1342", "mp-1009490", "mp-1977763"])).write_csv(csv)
    small = {"ops": {
        "prescreen": {"config": {"use_ray": False, "batch_rows": 8, "batch_size": 8}},
        "relaxed": {"config": {"use_ray": False, "top_k": 2, "steps": 60}},
        "references": {"config": {"use_ray": False, "mp_csv_path": str(csv), "steps": 40}},
        "phonons": {"config": {"use_ray": False, "top_n": 2, "supercell": [1, 1, 1], "mesh": [4, 4, 4],
                               "band_npoints": 5}},
        "shortlist": {"config": {"n_plots": 0}},
    }}
    reg = tmp_path / "surrogates.json"
    _registry(reg, [MP])
    resources = {"cgwgan_home": CgwganHome(home=str(home)),
                 "surrogate_registry": SurrogateRegistryResource(registry_path=str(reg), models_dir=str(m3gnet_dir)),
                 "ray_runtime": RayResource(num_cpus=1, object_store_mb=256)}
    defs = dg.Definitions(assets=[prescreen, relaxed, references, phonons, shortlist, surrogate_churn],
                          jobs=[RESCREEN_JOB, CHURN_JOB], resources=resources)
    sensor = make_surrogate_registry_sensor(rescreen_run_config=small)

    with dg.instance_for_test() as instance:
        def tick_and_run(cursor):
            """One sensor tick, then what the daemon would do: add partitions, launch the runs."""
            res = sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor))
            for req in res.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
            for req in res.run_requests:
                job = defs.resolve_job_def(req.job_name)
                run = job.execute_in_process(run_config=req.run_config, instance=instance,
                                             partition_key=str(req.partition_key) if req.partition_key else None)
                assert run.success
            return res

        r1 = tick_and_run(None)
        assert [str(r.partition_key) for r in r1.run_requests] == [f"Ba-O-Ru|{MP}"]
        _registry(reg, [MP, MATPES])
        r2 = tick_and_run(r1.cursor)
        assert [str(r.partition_key) for r in r2.run_requests] == [f"Ba-O-Ru|{MATPES}"]
        r3 = tick_and_run(r2.cursor)
        assert [r.job_name for r in r3.run_requests] == ["surrogate_churn_job"]

    sl_mp = store.read("shortlist", partition=f"Ba-O-Ru|{MP}")
    sl_new = store.read("shortlist", partition=f"Ba-O-Ru|{MATPES}")
    assert sl_mp.height == sl_new.height == 2
    assert set(sl_new["surrogate_sha256"]) == {registered_surrogates(str(reg), str(m3gnet_dir))[0][MATPES].sha256}
    churn = store.read("surrogate_churn").row(0, named=True)
    assert (churn["chemical_system"], churn["surrogate_a"], churn["surrogate_b"]) == ("Ba-O-Ru", MP, MATPES)
    # Spearman's rho over the candidates both ranked, from the two shortlists themselves
    from scipy.stats import spearmanr

    both = sl_mp.select("candidate_id", pl.col("rank").alias("a")).join(
        sl_new.select("candidate_id", pl.col("rank").alias("b")), on="candidate_id")
    assert churn["n_common"] == both.height == 2
    assert churn["spearman_rho"] == pytest.approx(spearmanr(both["a"], both["b"]).statistic)
    side = dict(zip(churn["candidate_ids"], zip(churn["ranks_a"], churn["ranks_b"], strict=True), strict=True))
    assert side == {r["candidate_id"]: (r["rank"], sl_new.filter(pl.col("candidate_id") == r["candidate_id"])
                                        ["rank"][0]) for r in sl_mp.iter_rows(named=True)}


def test_registry_sensor_verifies_each_entry_and_keeps_the_good_ones(
        home: Path, m3gnet_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Real weight folders: MatPES copied under a new name with MP's sha256 (wrong), an entry
    whose folder is missing and a malformed one sit next to a good MP entry. Only MP gets a
    partition; each bad entry is a warning naming it and its reason."""
    from lib.ids import file_sha256

    mp_sha = file_sha256(str(m3gnet_dir / MP / "state.pt"))
    matpes_sha = file_sha256(str(m3gnet_dir / MATPES / "state.pt"))
    copy = _copy(m3gnet_dir / MATPES, tmp_path / "models" / "MatPES-copy")
    reg = tmp_path / "surrogates.yaml"
    reg.write_text(
        "surrogates:\n"
        f"  - {{name: {MP}, kind: m3gnet, sha256: '{mp_sha}'}}\n"
        f"  - {{name: MatPES-wrong-sha, kind: m3gnet, weights: {copy}, sha256: '{mp_sha}'}}\n"
        f"  - {{name: MatPES-no-folder, kind: m3gnet, weights: {tmp_path / 'nowhere'}}}\n"
        "  - {name: malformed, kind: m3gnet, sha256: 12345}\n")
    resources = {"cgwgan_home": CgwganHome(home=str(home)),
                 "surrogate_registry": SurrogateRegistryResource(registry_path=str(reg), models_dir=str(m3gnet_dir))}
    with dg.instance_for_test() as instance:
        sensor = make_surrogate_registry_sensor()
        ctx = dg.build_sensor_context(instance=instance, resources=resources)
        ctx.log.addHandler(caplog.handler)  # the tick's log (shown with the tick in the UI)
        res = sensor(ctx)
        added = [k for r in res.dynamic_partitions_requests or [] if r.partitions_def_name == "surrogate"
                 for k in r.partition_keys]
        assert added == [MP]
        warned = [r.getMessage() for r in caplog.records if "registry entry skipped" in r.getMessage()]
        assert len(warned) == 3, warned
        assert any("MatPES-wrong-sha" in w and f"is {matpes_sha}, the registry says {mp_sha}" in w for w in warned)
        assert any("MatPES-no-folder" in w and "weights folder" in w and "not found" in w for w in warned)
        assert any("'malformed'" in w and "sha256 must be 64 hex digits" in w for w in warned)
        # the registry is still observed: the usable entry, the others named as unavailable
        (obs,) = res.asset_events
        assert obs.metadata["surrogates"].value == MP and obs.metadata["n_surrogates"].value == 1
        assert obs.metadata["unavailable"].value == "MatPES-wrong-sha, MatPES-no-folder, malformed"
        for req in res.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        again = sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=res.cursor))
        assert not again.run_requests and "3 entries skipped" in again.skip_reason.skip_message
        assert "MatPES-wrong-sha" in again.skip_reason.skip_message
        # fixing the entry's sha256 lets it through on the next tick
        reg.write_text(reg.read_text().replace(f"weights: {copy}, sha256: '{mp_sha}'",
                                               f"weights: {copy}, sha256: '{matpes_sha}'"))
        fixed = sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=again.cursor))
        assert [k for r in fixed.dynamic_partitions_requests or [] for k in r.partition_keys] == ["MatPES-wrong-sha"]


def test_rescreen_uses_the_sizes_the_system_was_first_screened_with(
        home: Path, m3gnet_dir: Path, tmp_path: Path) -> None:
    """Ba-O-Ru was screened with M3GNet-MP on a 5-of-12 sample, 3 relaxed, 2 phonon screens on
    2x2x2 supercells: registering MatPES re-screens it with those sizes (the sample is seeded, so
    the same candidates), phonons capped; the stages' defaults (all, 100, 20) are not used."""
    store = _fixture_store(home)
    store.write("candidates_dedup", pl.DataFrame({"candidate_id": [f"c{i}" for i in range(12)]}), partition="Ba-O-Ru")
    part = f"Ba-O-Ru|{MP}"
    store.write("prescreen", pl.DataFrame({"candidate_id": [f"c{i}" for i in range(5)]}), partition=part)
    store.write("relaxed", pl.DataFrame({"candidate_id": ["c0", "c1", "c2"]}), partition=part,
                metadata={"rank_by": "formation_energy", "per_composition_quota": 2, "fmax": 0.05})
    store.write("phonons", pl.DataFrame({"candidate_id": ["c0", "c1"]}), partition=part,
                metadata={"supercell": "[2, 2, 2]", "min_length_a": "None", "mesh": "[8, 8, 8]"})
    config, source = schedules.rescreen_run_config(store, "Ba-O-Ru")
    assert source == f"first screening {part}"
    assert config == {"ops": {
        "prescreen": {"config": {"max_candidates": 5, "sample_seed": 0}},  # no seed recorded: the stage default
        "relaxed": {"config": {"top_k": 3, "rank_by": "formation_energy", "per_composition_quota": 2}},
        "phonons": {"config": {"top_n": 2, "max_supercell_atoms": schedules.DEFAULT_MAX_SUPERCELL_ATOMS,
                               "supercell": [2, 2, 2]}}}}
    # through the sensor: MatPES is registered next to the recorded MP screening
    reg = tmp_path / "surrogates.json"
    _registry(reg, [MP, MATPES])
    resources = {"cgwgan_home": CgwganHome(home=str(home)),
                 "surrogate_registry": SurrogateRegistryResource(registry_path=str(reg), models_dir=str(m3gnet_dir))}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("surrogate", [MP])
        instance.add_dynamic_partitions("chemical_system", ["Ba-O-Ru"])
        sensor = make_surrogate_registry_sensor(rescreen_run_config={"ops": {"relaxed": {"config": {"steps": 60}}}})
        res = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        req = {str(r.partition_key): r for r in res.run_requests}[f"Ba-O-Ru|{MATPES}"]
        ops = req.run_config["ops"]
        assert ops["prescreen"]["config"]["max_candidates"] == 5 and ops["phonons"]["config"]["top_n"] == 2
        assert ops["relaxed"]["config"] == {"top_k": 3, "rank_by": "formation_energy", "per_composition_quota": 2,
                                            "steps": 60}  # the explicit config is merged over the recorded sizes
        assert req.tags["cgwgan/sizes_from"] == f"first screening {part}"
    # a system with no screening yet: the named profile's sizes
    _, source = schedules.rescreen_run_config(store, "Ba-Sr-O")
    assert source == "profile 'demo'"


def test_rescreen_reuses_the_recorded_prescreen_sample_and_seed(home: Path, m3gnet_dir: Path) -> None:
    """The real prescreen asset (CHGNet, in-process) screens a seeded 3-of-5 sample of Ba-O-Ru; its
    size and seed are recorded with it, rescreen_run_config returns them, and M3GNet's re-screen
    with that config pre-screens exactly the same candidates (seed 0, the stage default, would not)."""
    import torch

    from assets.screening import prescreen
    from lib.selection import stratified_sample
    from tests.lib.test_screening import ba_ru_o_dedup_frame

    torch.set_num_threads(1)
    store = TableStore(home)
    dedup = ba_ru_o_dedup_frame()
    store.write("candidates_dedup", dedup, partition="Ba-O-Ru")
    from orchestration.resources import RayResource

    first, resources = "CHGNet-0.3.0", {"cgwgan_home": CgwganHome(home=str(home)), "ray_runtime": RayResource(),
                                        "surrogate_registry": SurrogateRegistryResource(models_dir=str(m3gnet_dir))}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("chemical_system", ["Ba-O-Ru"])
    instance.add_dynamic_partitions("surrogate", [first, MP])

    def run_prescreen(surrogate: str, config: dict) -> list[str]:
        res = dg.materialize([prescreen], instance=instance, resources=resources,
                             partition_key=dg.MultiPartitionKey({"chemical_system": "Ba-O-Ru", "surrogate": surrogate}),
                             run_config={"ops": {"prescreen": {"config": {"use_ray": False, **config}}}})
        assert res.success
        return store.read("prescreen", partition=f"Ba-O-Ru|{surrogate}")["candidate_id"].sort().to_list()

    screened = run_prescreen(first, {"max_candidates": 3, "sample_seed": 2, "volume_scan": [0.9, 1.0, 1.1]})
    md = store.pointer("prescreen", f"Ba-O-Ru|{first}")["metadata"]
    assert (md["max_candidates"], md["sample_seed"], md["volume_scan"]) == (3, 2, [0.9, 1.0, 1.1])
    # the first screening's later stages: only that its relaxed partition exists matters here
    _fixture_store(home).write("relaxed", pl.DataFrame({"candidate_id": screened[:2]}), partition=f"Ba-O-Ru|{first}")
    config, source = schedules.rescreen_run_config(store, "Ba-O-Ru", exclude_surrogate=MP)
    assert source == f"first screening Ba-O-Ru|{first}"
    assert config["ops"]["prescreen"]["config"] == {"max_candidates": 3, "sample_seed": 2, "volume_scan": [0.9, 1.0, 1.1]}
    assert run_prescreen(MP, config["ops"]["prescreen"]["config"]) == screened
    assert stratified_sample(dedup, 3, seed=0)["candidate_id"].sort().to_list() != screened


def test_registry_sensor_observes_the_registry_when_its_version_changes(
        home: Path, m3gnet_dir: Path, tmp_path: Path) -> None:
    """The sensor reports an observation of the surrogate_registry source asset (the data version
    an Observe click gives) on its first tick and whenever the registry's version changes; the
    instance then holds that data version without anyone observing by hand."""
    reg = tmp_path / "surrogates.json"
    _registry(reg, [MP])
    resource = SurrogateRegistryResource(registry_path=str(reg), models_dir=str(m3gnet_dir))
    resources = {"cgwgan_home": CgwganHome(home=str(home)), "surrogate_registry": resource}
    observe = dg.Definitions(assets=[surrogate_registry], resources={"surrogate_registry": resource}, jobs=[
        dg.define_asset_job("observe_registry", selection=[surrogate_registry])]).resolve_job_def("observe_registry")
    sensor = make_surrogate_registry_sensor()
    with dg.instance_for_test() as instance:
        def tick(cursor):
            res = sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor))
            for event in res.asset_events:  # what the daemon does with them
                instance.report_runless_asset_event(event)
            return res

        def observed_version() -> str | None:
            rec = instance.get_latest_data_version_record(dg.AssetKey("surrogate_registry"), is_source=True)
            return rec.asset_observation.tags["dagster/data_version"] if rec and rec.asset_observation else None

        def clicked_version() -> str:  # an Observe click, in a throwaway instance
            run = observe.execute_in_process(instance=dg.DagsterInstance.ephemeral())
            obs = [e for e in run.all_events if e.event_type_value == "ASSET_OBSERVATION"]
            return obs[0].event_specific_data.asset_observation.tags["dagster/data_version"]

        assert observed_version() is None
        r1 = tick(None)
        assert [e.asset_key for e in r1.asset_events] == [dg.AssetKey("surrogate_registry")]
        one = registry_version(registered_surrogates(str(reg), str(m3gnet_dir))[0])
        assert observed_version() == one == clicked_version()
        assert r1.asset_events[0].metadata["surrogates"].value == MP
        r2 = tick(r1.cursor)
        assert not r2.asset_events and observed_version() == one  # unchanged: not observed again
        _registry(reg, [MP, MATPES])
        r3 = tick(r2.cursor)
        two = registry_version(registered_surrogates(str(reg), str(m3gnet_dir))[0])
        assert two != one and [e.tags["dagster/data_version"] for e in r3.asset_events] == [two]
        assert observed_version() == two == clicked_version()
        assert not tick(r3.cursor).asset_events
