"""End-to-end materialisation of the ``mp`` group through Dagster, on real data and real Ray."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from assets import mp as mp_assets
from orchestration.resources import CgwganHome, MPSource, RayResource

pytestmark = pytest.mark.ray

N_SLICE = 200


@pytest.fixture(scope="module")
def ray_down():
    """One local Ray for the module (RayResource.init() reuses it), shut down at the end."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    RayResource(num_cpus=1, object_store_mb=256).init()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mp_slice(mp_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 real rows of the shared MP file plus one duplicate and one broken row, as CSV.gz."""
    df = pl.read_csv(mp_file, infer_schema_length=0, n_rows=N_SLICE)
    bad = df.head(2).with_columns(
        pl.Series("material_id", [df["material_id"][0], "mp-broken"]),
        pl.Series("cif", [df["cif"][0], "data_broken\n_cell_length_a 4\n"]),
    )
    path = tmp_path_factory.mktemp("mp_slice") / "mp_slice.csv.gz"
    import gzip

    with gzip.open(path, "wb") as fh:
        pl.concat([df, bad]).write_csv(fh)
    return path


def _resources(home: Path, source: str) -> dict:
    return {
        "cgwgan_home": CgwganHome(home=str(home)),
        "mp_source": MPSource(source=source),
        "ray_runtime": RayResource(num_cpus=1, object_store_mb=256),
    }


def _group_assets():
    return [mp_assets.mp_structures, mp_assets.mp_symmetry, mp_assets.training_templates]


def _group_checks():
    return [mp_assets.mp_structures_rows_accounted, mp_assets.mp_symmetry_round_trip_rate,
            mp_assets.mp_symmetry_covers_structures, mp_assets.training_templates_valid,
            *mp_assets.contract_checks]


CONTRACT_CHECKS = tuple(f"{t}_matches_contract" for t in
                        ("mp_structures", "mp_structures_rejects", "mp_symmetry", "training_templates"))


def test_mp_group_end_to_end(home: Path, mp_slice: Path, ray_down) -> None:
    result = dg.materialize(
        [*_group_assets(), *_group_checks()],
        resources=_resources(home, str(mp_slice)),
        run_config={"ops": {"training_templates": {"config": {"exclude_chemical_systems": ["Te-Ga"]}}}},
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {c: True for c in ("mp_structures_rows_accounted", "mp_symmetry_round_trip_rate",
                                        "mp_symmetry_covers_structures", "training_templates_valid",
                                        *CONTRACT_CHECKS)}
    mats = result.asset_materializations_for_node("mp_structures")
    assert {m.asset_key.to_user_string(): m.metadata["dagster/row_count"].value for m in mats} == {
        "mp_structures": N_SLICE, "mp_structures_rejects": 2}

    from lib.store import TableStore

    store = TableStore(home)
    structures = store.read("mp_structures")
    rejects = store.read("mp_structures_rejects")
    assert structures.height == N_SLICE
    assert sorted(rejects["reason"].to_list()) == ["duplicate_material_id", "malformed_cif"]
    assert rejects.filter(pl.col("reason") == "malformed_cif")["source_ref"].item() == f"mp_slice.csv.gz:{N_SLICE + 3}"
    assert structures["snapshot_id"].n_unique() == 1 and structures["snapshot_id"][0].startswith("snap-")
    assert structures["source"][0] == "file:mp_slice.csv.gz"

    sym = store.read("mp_symmetry")
    assert sym.height == N_SLICE
    assert sym["is_round_trip_ok"].mean() >= 0.99
    # the shared file's own space group column (spglib at symprec 0.1) agrees with ours
    ref = pl.read_csv(mp_slice, infer_schema_length=0).select(
        "material_id", pl.col("spacegroup_number_symprec0.1").cast(pl.Int64).alias("ref_sg"))
    joined = sym.join(ref.unique("material_id"), on="material_id")
    assert (joined["spacegroup_number"] == joined["ref_sg"]).mean() > 0.98

    training = store.read("training_templates")
    assert training.height > 50
    assert training["n_asu_sites"].max() <= 4 and training["spacegroup_number"].min() >= 2
    assert "Ga-Te" not in training["chemical_system"].to_list()
    assert "Ga-Te" in sym.join(structures.select("material_id", "chemical_system"), on="material_id")[
        "chemical_system"].to_list()
    assert training["encoding"].list.len().n_unique() == 1

    md = result.asset_materializations_for_node("mp_symmetry")[0].metadata
    assert md["round_trip_rate"].value >= 0.99 and md["workers"].value == 1

    con = store.connect()
    n = con.sql("SELECT count(*) FROM training_templates").fetchall()[0][0]
    assert n == training.height
    assert (home / "catalog.duckdb").exists()
    sql_dir = Path(__file__).resolve().parents[2] / "sql" / "examples"
    by_sg = con.sql((sql_dir / "mp_counts_by_spacegroup.sql").read_text()).pl()
    assert by_sg["structures"].sum() >= min(N_SLICE, 40) and by_sg["training_rows"].sum() > 0
    by_sites = con.sql((sql_dir / "mp_counts_by_asu_sites.sql").read_text()).pl()
    assert by_sites["structures"].sum() == N_SLICE
    by_reason = con.sql((sql_dir / "mp_rejects_by_reason.sql").read_text()).pl()
    got = dict(zip(by_reason["reason"], by_reason["n_rows"], strict=True))
    assert got["duplicate_material_id"] == 1 and got["malformed_cif"] == 1


def test_embedded_default_on_fresh_home(home: Path, ray_down, monkeypatch: pytest.MonkeyPatch) -> None:
    """No source configured: the 288 AFLOW prototypes from pymatgen and the 23 Ba-Ru-O MP phases
    shipped in the package, offline."""
    monkeypatch.delenv("CGWGAN_MP_SOURCE", raising=False)
    assert not any(home.iterdir())
    result = dg.materialize(
        [mp_assets.mp_structures, mp_assets.mp_structures_rows_accounted, *mp_assets.contract_checks[:2]],
        resources=_resources(home, ""),
    )
    assert result.success
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {
        "mp_structures_rows_accounted": True, "mp_structures_matches_contract": True,
        "mp_structures_rejects_matches_contract": True}
    md = next(m.metadata for m in result.asset_materializations_for_node("mp_structures")
              if m.asset_key == dg.AssetKey("mp_structures"))
    assert md["source"].value == "embedded:aflow_prototypes+known_phases_ba_ru_o"
    assert md["n_input"].value == 288 + 7
    from lib.store import TableStore

    store = TableStore(home)
    assert store.rows("mp_structures") + store.rows("mp_structures_rejects") == 288 + 7
    assert store.read("mp_structures")["material_id"].is_unique().all()


def test_unreadable_source_fails_the_run(home: Path, tmp_path: Path, ray_down) -> None:
    bad = tmp_path / "not_there.csv.gz"
    result = dg.materialize([mp_assets.mp_structures], resources=_resources(home, str(bad)),
                            raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "not_there.csv.gz" in str(failure.event_specific_data.error)


def test_mp_module_definitions_resolve() -> None:
    """The mp module's assets and checks load into Definitions with the platform's resources."""
    defs = dg.Definitions(
        assets=dg.load_assets_from_modules([mp_assets]),
        asset_checks=dg.load_asset_checks_from_modules([mp_assets]),
        resources={"cgwgan_home": CgwganHome(), "mp_source": MPSource(), "ray_runtime": RayResource()},
    )
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"mp_structures", "mp_structures_rejects", "mp_symmetry", "training_templates"}
    assert {graph.get(dg.AssetKey(k)).group_name for k in keys} == {"mp"}
    assert len(graph.asset_check_keys) == 4 + len(CONTRACT_CHECKS)
    defs.resolve_implicit_global_asset_job_def()
