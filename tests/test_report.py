"""``cgwgan report``: the discovery report (lib.report) written from a small real store.

The store holds the real Ba-Ru-O MP data: ``mp_structures`` loaded from the shared CSV; the
competing phases on MP's own formation-energy footing (energy = MP formation energy x atoms, the
elements at 0, MP's ground states mp-122 Ba and mp-33 Ru from the shared energies file); five MP
polymorphs above the hull as the "candidates", their hull energies from pymatgen through
``lib.screening.formation_and_hull``, their shortlist through ``build_shortlist``, and a real
phonopy screen of two of them with CHGNet (offline surrogate) forces.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lib import screening as scr
from lib.mp_sources import load_mp_source
from lib.phonons import phonon_frame
from lib.report import canonical_system, write_report
from lib.store import TableStore
from orchestration.cli import main

SURROGATE = "CHGNet-0.3.0"
CHEMSYS = "Ba-O-Ru"
PART = f"{CHEMSYS}|{SURROGATE}"
#: MP polymorphs above MP's hull, screened as if they were generated candidates.
CANDIDATES = ["mp-3598", "mp-8909", "mp-1006878", "mp-1182169", "mp-1182259"]
PHONON_IDS = ["cand-mp-1006878", "cand-mp-8909"]


@pytest.fixture(scope="module")
def report_home(tmp_path_factory: pytest.TempPathFactory, ba_ru_o_dir: Path) -> Path:
    import torch

    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("report_home")
    strict = TableStore(home)
    loose = TableStore(home, contracts={})  # tables written with the columns the report reads
    mp = load_mp_source(str(ba_ru_o_dir / "ba_ru_o_mp_structures.csv")).structures
    strict.write("mp_structures", mp)

    def phase(df: pl.DataFrame) -> pl.DataFrame:
        return df.select(pl.col("material_id").alias("phase_id"), pl.col("formula").str.replace_all(" ", ""),
                         (pl.col("formation_energy_per_atom_ev") * pl.col("nsites")).alias("energy_ev"),
                         pl.lit("ok").alias("status"))

    lemat = pl.read_csv(ba_ru_o_dir / "ba_ru_o_mp20_lemat_energies.csv").filter(
        pl.col("material_id").is_in(["mp-122", "mp-33"]))
    grounds = lemat.select(pl.col("material_id").alias("phase_id"),
                           pl.col("species_at_sites").str.replace_all(" ", "").alias("formula"),
                           (pl.col("formation_energy_per_atom") * pl.col("species_at_sites").str.split(" ").list.len())
                           .alias("energy_ev"), pl.lit("ok").alias("status"))
    refs = pl.concat([phase(mp.filter(~pl.col("material_id").is_in(CANDIDATES))), grounds])
    cells = mp.filter(pl.col("material_id").is_in(CANDIDATES)).with_columns(
        ("cand-" + pl.col("material_id")).alias("candidate_id"))
    cands = cells.select("candidate_id", "species", (pl.col("formation_energy_per_atom_ev") * pl.col("nsites"))
                         .alias("energy_ev"), pl.lit("ok").alias("status"))
    hull = scr.formation_and_hull(refs, cands, elements=CHEMSYS.split("-"))
    ref_rows = refs.join(hull.references, on="phase_id").with_columns(kind=pl.lit("reference"))
    cand_rows = cands.drop("species").join(hull.candidates.drop("status"), on="candidate_id").with_columns(
        kind=pl.lit("candidate"), phase_id=pl.col("candidate_id"),
        formula=cells["formula"].str.replace_all(" ", ""))
    loose.write("reference_energies", pl.concat([ref_rows, cand_rows], how="diagonal_relaxed"), partition=PART)
    relaxed = cells.select(
        "candidate_id", pl.lit(None, pl.String).alias("template_id"), pl.lit(None, pl.String).alias("checkpoint_id"),
        pl.lit(SURROGATE).alias("surrogate_name"), pl.lit("0" * 64).alias("surrogate_sha256"),
        pl.lit(scr.CODE_VERSION).alias("code_version"), pl.col("formula").str.replace_all(" ", ""),
        "reduced_formula", pl.col("nsites").alias("n_atoms"), "lattice_matrix", "species", "frac_coords",
        (pl.col("formation_energy_per_atom_ev") * pl.col("nsites")).alias("energy_ev"),
        pl.col("formation_energy_per_atom_ev").alias("energy_per_atom_ev"), pl.lit(True).alias("is_converged"),
        pl.lit("ok").alias("status"))
    loose.write("relaxed", relaxed, partition=PART)
    surrogate = scr.load_configured_surrogate(SURROGATE, threads=1)
    ph = phonon_frame(surrogate, relaxed.filter(pl.col("candidate_id").is_in(PHONON_IDS)), supercell=(2, 2, 2),
                          mesh=(4, 4, 4), band_npoints=5).rename({"key": "candidate_id"})
    loose.write("phonons", ph.with_columns(formula=pl.lit(None, pl.String)), partition=PART)
    short = scr.build_shortlist(relaxed, cand_rows, ph).with_columns(
        pl.lit(None, pl.String).alias("duplicate_of"), pl.col("rank").alias("unique_rank"),
        pl.col("candidate_id").str.strip_prefix("cand-").alias("known_material_id"), pl.lit(False).alias("is_novel"))
    loose.write("shortlist", short, partition=PART)
    return home


def _pngs(text: str) -> dict[str, list[np.ndarray]]:
    from matplotlib.image import imread

    out: dict[str, list[np.ndarray]] = {}
    for name, b64 in re.findall(r'data-plot="(\w+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text):
        out.setdefault(name, []).append(imread(io.BytesIO(base64.b64decode(b64)), format="png"))
    return out


def test_report_of_a_real_store(report_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = report_home / "r" / "report.html"
    rc = main(["report", "--home", str(report_home), "--system", "Ru-Ba-O", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and f"wrote {out}" in printed and "relaxed 5" in printed
    text = out.read_text()
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(https?:|//|file:)', text) and "<script" not in text and "<link" not in text
    # the plots rendered: decoded PNGs of real size with more than a flat background
    imgs = _pngs(text)
    assert set(imgs) == {"hull", "energies", "bands"} and len(imgs["bands"]) == 2
    for arrs in imgs.values():
        for a in arrs:
            assert a.shape[0] > 150 and a.shape[1] > 200 and float(a[..., :3].std()) > 0.05
            assert len(np.unique(a[..., :3].reshape(-1, 3), axis=0)) > 50
    # the top candidates, in the shortlist's order, with the numbers of the tables
    short = TableStore(report_home).read("shortlist", PART).sort("rank")
    rows = re.findall(r"<tr><td[^>]*>(\d+)</td><td>(cand-mp-\d+)</td>", text)
    assert [r[1] for r in rows] == short["candidate_id"].to_list()
    for r in short.iter_rows(named=True):
        assert f"known: {r['known_material_id']}" in text
        assert f"{r['e_above_hull_ev_per_atom']:.4g}" in text
    ph = TableStore(report_home).read("phonons", PART).filter(pl.col("status") == "ok")
    assert ph.height == 2
    for r in ph.iter_rows(named=True):
        verdict = "stable" if r["is_dynamically_stable"] else "unstable"
        assert f"{verdict} (min {r['min_frequency_thz']:.2f} THz)" in text
    assert text.count("not screened") == short.height - 2
    # a CIF link per candidate that reads back as its relaxed cell
    from pymatgen.core import Structure

    links = dict(re.findall(r'download="(cand-mp-\d+)\.cif" href="data:chemical/x-cif;base64,([^"]+)"', text))
    assert sorted(links) == sorted(short["candidate_id"])
    s = Structure.from_str(base64.b64decode(links["cand-mp-3598"]).decode(), fmt="cif")
    assert s.composition.reduced_formula == "BaRuO3" and len(s) == 30
    # lineage and funnel: the MP snapshot, the surrogate, stages not materialised said so
    mp = TableStore(report_home).read("mp_structures")
    assert mp["snapshot_id"][0] in text and SURROGATE in text
    assert "not materialised" in text and "phonon-stable" in text


def test_report_errors(report_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--home", str(report_home), "--system", "Ba-Sr-O"]) == 1
    err = capsys.readouterr().err
    assert "no shortlist of Ba-O-Sr" in err and "(shortlists: Ba-O-Ru)" in err
    assert main(["report", "--home", str(report_home), "--system", "Ba-O-Ru", "--surrogate", "Nope"]) == 1
    assert "screened with: CHGNet-0.3.0" in capsys.readouterr().err
    assert canonical_system("O, Ru ,Ba") == CHEMSYS
    with pytest.raises(ValueError, match="'Qq' is not an element"):
        canonical_system("Ba-Qq")
    with pytest.raises(ValueError, match="at least two elements"):
        write_report(TableStore(report_home), report_home / "x.html", chemical_system="Ba")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(report_home: Path, tmp_path: Path) -> None:
    """The file opened offline in headless Chromium: no request leaves the file, every plot is a
    decoded image of its natural size, and the screenshots of the plots are not blank."""
    from matplotlib.image import imread

    from tests.test_browser import CHROMIUM_ARGS, _chromium, _missing

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    out = tmp_path / "report.html"
    write_report(TableStore(report_home), out, chemical_system=CHEMSYS)
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", lambda route: (outside.append(route.request.url), route.abort())
                       if not route.request.url.startswith(("file:", "data:")) else route.continue_())
            page.goto(out.as_uri())
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            imgs = page.locator("img.plot")
            assert imgs.count() == 4  # hull, energies, two band structures
            for i in range(imgs.count()):
                img = imgs.nth(i)
                w, h, done = img.evaluate("el => [el.naturalWidth, el.naturalHeight, el.complete]")
                assert done and w > 200 and h > 150, (img.get_attribute("data-plot"), w, h)
                shot = imread(io.BytesIO(img.screenshot()), format="png")
                assert float(shot[..., :3].std()) > 0.05, img.get_attribute("data-plot")
            assert page.title() == "CGWGAN discovery report: Ba-O-Ru"
            assert page.get_by_text("Top 5 distinct candidates").is_visible()
        finally:
            browser.close()
    assert outside == []
    page_png = imread(str(tmp_path / "page.png"))
    assert page_png.shape[0] > 1500  # the whole page: tables and plots


def test_discovery_report_asset(report_home: Path) -> None:
    """The same report as a Dagster asset of the chemical system, with the path and funnel in its metadata."""
    import dagster as dg

    from assets.reports import discovery_report
    from orchestration.resources import CgwganHome

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("chemical_system", [CHEMSYS, "Ba-O-Sr"])
    res = dg.materialize([discovery_report], partition_key=CHEMSYS, instance=instance,
                         resources={"cgwgan_home": CgwganHome(home=str(report_home))})
    assert res.success
    md = res.asset_materializations_for_node("discovery_report")[0].metadata
    path = Path(md["path"].value)
    assert path == report_home.resolve() / "reports" / f"discovery-{CHEMSYS}.html" and path.is_file()
    assert md["surrogates"].value == SURROGATE and md["n_candidates_shown"].value == 5
    assert "| relaxed | 5 |" in md["funnel"].value and 'data-plot="hull"' in path.read_text()
    bad = dg.materialize([discovery_report], partition_key="Ba-O-Sr", instance=instance, raise_on_error=False,
                         resources={"cgwgan_home": CgwganHome(home=str(report_home))})
    assert not bad.success
    failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
    assert "no shortlist of Ba-O-Sr" in str(failure.event_specific_data.error)
