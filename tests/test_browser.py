"""Browser test: ``dagster dev`` + headless Chromium (Debian's package) driven by Playwright.

Starts ``dagster dev -w workspace.yaml`` from the repository root on a free local port, with
``DAGSTER_HOME``, ``CGWGAN_HOME`` and a 30-row slice of the shared MP file in a temporary folder;
opens the asset graph and checks the stage groups and their assets are drawn; materialises
``mp_structures`` and then ``xrd_patterns`` over those structures through the webserver's GraphQL
API (the same call the UI's Materialize button makes, plus run config: the in-process executor and
the XRD selection); waits for both runs to succeed; checks the run page says so; and checks that
the XRD plot of the materialisation's metadata renders as an image in the asset's page.

Dagster's onboarding pop-up ("Join the Dagster community", shown one second after the first page
of a fresh instance loads on localhost) cannot block it: every page sets the UI's own dismissal
flag (local storage ``communityNux``) before it loads, a locator handler dismisses the dialog
should it appear anyway (a renamed flag), and the asset graph is checked to be visible and on top
(nothing covering it) a while after the pop-up would have opened. A last page without the flag
checks the handler's path: the pop-up opens, is dismissed with its Skip button, and the graph is
on top again.

``CGWGAN_BROWSER_WORKSPACE`` may point at another workspace file (debugging only).

Needs ``/usr/bin/chromium`` (``make browser-deps``) and the ``playwright`` package (dev extra;
its bundled node driver only, Playwright's browser download is not used). Outside CI a missing
piece skips the test with a message; in CI (``CI=true``) it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
WORKSPACE = Path(os.environ.get("CGWGAN_BROWSER_WORKSPACE") or REPO / "workspace.yaml")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
MP_SLICE_ROWS = 30
XRD_STRUCTURES = 6
SERVER_TIMEOUT_S = 240
RUN_TIMEOUT_S = 240
UI_TIMEOUT_MS = 60_000


def _missing(msg: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        _missing("Debian's chromium is not installed (run `make browser-deps`)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dagster_cli() -> str:
    exe = Path(sys.executable).with_name("dagster")
    return str(exe) if exe.exists() else (shutil.which("dagster") or "dagster")


class Dagster:
    """A ``dagster dev`` process group and a small GraphQL client for it."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def graphql(self, query: str, variables: dict | None = None, *, timeout: float = 30) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = json.loads(resp.read())
        if out.get("errors"):
            raise AssertionError(f"GraphQL errors: {out['errors']}")
        return out["data"]

    def wait_until_loaded(self, timeout: float) -> None:
        """Until the webserver answers and the code location has loaded (or failed to)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dagster dev exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                data = self.graphql(WORKSPACE_QUERY, timeout=10)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = f"webserver: {exc}"
                time.sleep(1)
                continue
            entries = data["workspaceOrError"].get("locationEntries") or []
            for e in entries:
                loc = e.get("locationOrLoadError") or {}
                if loc.get("__typename") == "PythonError":
                    raise AssertionError(f"code location {e['name']} failed to load: {loc.get('message')}\n"
                                         f"{''.join(loc.get('stack') or [])[-3000:]}")
                if loc.get("__typename") == "RepositoryLocation":
                    return
            last = f"code location state: {[(e['name'], e['loadStatus']) for e in entries]}"
            time.sleep(1)
        raise AssertionError(f"dagster dev not ready after {timeout:.0f} s ({last}):\n{self.log_tail()}")

    def launch(self, assets: list[str], run_config: dict) -> str:
        data = self.graphql(LAUNCH_MUTATION, {"executionParams": {
            "selector": {"repositoryLocationName": self.location, "repositoryName": self.repository,
                         "jobName": "__ASSET_JOB", "assetSelection": [{"path": [a]} for a in assets]},
            "runConfigData": run_config,
            "mode": "default",
        }})
        res = data["launchRun"]
        if res["__typename"] != "LaunchRunSuccess":
            raise AssertionError(f"launchRun failed: {json.dumps(res)[:3000]}")
        return res["run"]["runId"]

    def wait_for_run(self, run_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = "?"
        while time.monotonic() < deadline:
            status = self.graphql(RUN_QUERY, {"runId": run_id})["runOrError"]["status"]
            if status == "SUCCESS":
                return
            if status in ("FAILURE", "CANCELED"):
                raise AssertionError(f"run {run_id} {status}:\n{self.run_errors(run_id)}")
            time.sleep(2)
        raise AssertionError(f"run {run_id} still {status} after {timeout:.0f} s:\n{self.run_errors(run_id)}\n"
                             f"{self.log_tail()}")

    def run_errors(self, run_id: str) -> str:
        events = self.graphql(LOGS_QUERY, {"runId": run_id})["logsForRun"].get("events") or []
        out = [f"{e.get('stepKey')}: {e.get('message')} {((e.get('error') or {}).get('message') or '')}"
               for e in events if e.get("level") in ("ERROR", "CRITICAL")]
        return "\n".join(out[-10:]) or "(no error events)"

    location = "cgwgan"
    repository = "__repository__"


WORKSPACE_QUERY = """
query { workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on RepositoryLocation { name repositories { name } }
                        ... on PythonError { message stack } } } } } }
"""
LAUNCH_MUTATION = """
mutation Launch($executionParams: ExecutionParams!) { launchRun(executionParams: $executionParams) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message stack }
  ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message }
  ... on PipelineNotFoundError { message } } }
"""
RUN_QUERY = "query Run($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } } }"
LOGS_QUERY = """
query Logs($runId: ID!) { logsForRun(runId: $runId) { __typename ... on EventConnection { events {
  __typename ... on MessageEvent { message level stepKey }
  ... on ExecutionStepFailureEvent { error { message } } ... on RunFailureEvent { error { message } } } } } }
"""


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory, mp_file: Path) -> Iterator[Dagster]:
    _chromium()
    if not WORKSPACE.exists():
        pytest.fail(f"workspace file not found: {WORKSPACE}")
    tmp = tmp_path_factory.mktemp("browser")
    mp_slice = tmp / "mp_slice.csv"
    pl.read_csv(mp_file, n_rows=MP_SLICE_ROWS, infer_schema_length=0).write_csv(mp_slice)
    (tmp / "dagster_home").mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(tmp / "dagster_home"), "CGWGAN_HOME": str(tmp / "cgwgan_home"),
           "CGWGAN_MP_SOURCE": str(mp_slice), "PYTHONUNBUFFERED": "1",
           "DAGSTER_DISABLE_TELEMETRY": "1", "PYTHONPATH": os.pathsep.join(
               p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("RAY_ADDRESS", None)  # a local Ray inside the run, never a cluster of the caller's
    port = _free_port()
    log = tmp / "dagster_dev.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [_dagster_cli(), "dev", "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server = Dagster(f"http://127.0.0.1:{port}", proc, log)
    try:
        t0 = time.monotonic()
        server.wait_until_loaded(SERVER_TIMEOUT_S)
        print(f"dagster dev ready in {time.monotonic() - t0:.0f} s")
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group (webserver, daemon, code server, run workers), then SIGKILL."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; give its group a moment, then make sure nothing of it is left
        time.sleep(1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


@pytest.fixture(scope="module")
def browser(dagster_dev: Dagster) -> Iterator:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


#: Dagster's onboarding pop-up (dagster-webserver's CommunityNux) and its dismissal flag: the UI stores
#: JSON "1" under this local-storage key when the pop-up's Skip button is pressed, and then never shows it.
NUX_TITLE = "Join the Dagster community"
NUX_STORAGE_KEY = "communityNux"
NUX_DELAY_S = 1.0  # the pop-up opens this long after the page has loaded
NUX_QUERY = "query { shouldShowNux }"


def _page(browser, *, nux_flag: bool = True, nux_handler: bool = True):
    """A page with the pop-up's dismissal flag set before any of the UI's scripts run
    (``nux_flag``) and a handler that dismisses the pop-up whenever it would block an action
    (``nux_handler``)."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(UI_TIMEOUT_MS)
    if nux_flag:
        page.add_init_script(f"window.localStorage.setItem({json.dumps(NUX_STORAGE_KEY)}, {json.dumps(json.dumps('1'))});")
    if nux_handler:
        page.add_locator_handler(page.get_by_text(NUX_TITLE, exact=True), lambda _: _dismiss_nux(page))
    return page


def _dismiss_nux(page) -> None:
    page.get_by_role("button", name="Skip", exact=True).click()


def _on_top(page, text: str, what: str) -> None:
    """``text`` is visible and nothing covers it: the topmost element at its centre is it (or part
    of it), not a dialog's backdrop."""
    _visible(page, text, what)
    el = page.get_by_text(text, exact=True).first
    hit = el.evaluate("""e => { const r = e.getBoundingClientRect();
        const t = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
        return t === null ? 'nothing' : (e.contains(t) || t.contains(e)) ? 'ok' :
               (t.outerHTML || '').slice(0, 200); }""")
    assert hit == "ok", f"{what}: {text!r} at {page.url} is covered by {hit}"


def _nux_pending(server: Dagster) -> bool | None:
    """Whether the webserver would show the pop-up to a browser without the flag (None: this
    Dagster has no such query)."""
    try:
        return bool(server.graphql(NUX_QUERY)["shouldShowNux"])
    except AssertionError:
        return None


def _visible(page, text: str, what: str) -> None:
    try:
        page.get_by_text(text, exact=True).first.wait_for(state="visible")
    except Exception as exc:  # playwright TimeoutError: say what was expected where
        body = page.locator("body").inner_text()[:1500]
        raise AssertionError(f"{what}: {text!r} not visible at {page.url}; page text:\n{body}") from exc


def test_asset_graph_materialise_and_plot(dagster_dev: Dagster, browser) -> None:
    url = dagster_dev.url
    page = _page(browser)

    # 1. The global asset graph shows the stage groups; the group graphs show their assets. A fresh
    #    instance would greet this first visit with the onboarding pop-up (the server says so): it
    #    does not open, and after its delay the graph is still on top.
    nux_pending = _nux_pending(dagster_dev)
    assert nux_pending is not False, "a fresh instance should still owe its first visitor the pop-up"
    page.goto(f"{url}/asset-groups", wait_until="domcontentloaded")
    for group in ("mp", "reports"):
        _visible(page, group, "global asset graph")
    page.wait_for_timeout(int((NUX_DELAY_S + 1.5) * 1000))
    assert not page.get_by_text(NUX_TITLE, exact=True).is_visible(), "the onboarding pop-up opened"
    for group in ("mp", "reports"):
        _on_top(page, group, "global asset graph after the pop-up's delay")
    for group, asset in (("mp", "mp_structures"), ("reports", "xrd_patterns")):
        page.goto(f"{url}/locations/{dagster_dev.repository}@{dagster_dev.location}/asset-groups/{group}",
                  wait_until="domcontentloaded")
        _visible(page, asset, f"asset graph of group {group}")

    # 2. Materialise mp_structures from the 30-row MP slice, then xrd_patterns over it. Launched
    #    through the webserver's GraphQL API (in-process executor: faster on a 2-core machine;
    #    xrd_patterns needs run config), one after the other: xrd_patterns does not depend on
    #    mp_structures in the graph, so one run would not order them.
    in_process = {"execution": {"config": {"in_process": {}}}}
    t0 = time.monotonic()
    # mp_structures and xrd_patterns are multi-assets (mp_structures_rejects, xrd_similarity are
    # written by the same op), so each selection names both tables, as the UI's "Materialize" does.
    mp_run = dagster_dev.launch(["mp_structures", "mp_structures_rejects"], in_process)
    dagster_dev.wait_for_run(mp_run, RUN_TIMEOUT_S)
    print(f"mp_structures run: {time.monotonic() - t0:.0f} s")
    t0 = time.monotonic()
    xrd_run = dagster_dev.launch(["xrd_patterns", "xrd_similarity"], {**in_process, "ops": {"xrd_patterns": {"config": {
        "tables": ["mp_structures"], "required_tables": ["mp_structures"],
        "max_structures_per_table": XRD_STRUCTURES}}}})
    dagster_dev.wait_for_run(xrd_run, RUN_TIMEOUT_S)
    print(f"xrd_patterns run: {time.monotonic() - t0:.0f} s")

    # 3. The run page reports the success.
    page.goto(f"{url}/runs/{xrd_run}", wait_until="domcontentloaded")
    _visible(page, "Success", "run page")

    # 4. The asset page shows the materialisation's metadata; the XRD plot renders as an image.
    page.goto(f"{url}/assets/xrd_patterns", wait_until="domcontentloaded")
    _visible(page, "xrd_plot", "asset page metadata")
    _visible(page, str(XRD_STRUCTURES), "n_patterns metadata")
    img = _find_plot(page)
    width, height, complete = img.evaluate("el => [el.naturalWidth, el.naturalHeight, el.complete]")
    assert complete and width > 300 and height > 200, f"XRD plot did not render: {width}x{height}"
    page.close()

    # 5. Without the flag (a renamed key, another browser): the pop-up opens on a fresh instance, is
    #    detected and dismissed with its Skip button, and the asset graph is on top again.
    if nux_pending:
        bare = _page(browser, nux_flag=False, nux_handler=False)  # detected and dismissed here
        bare.goto(f"{url}/asset-groups", wait_until="domcontentloaded")
        _visible(bare, NUX_TITLE, "onboarding pop-up of a fresh instance")
        _dismiss_nux(bare)
        bare.get_by_text(NUX_TITLE, exact=True).wait_for(state="hidden")
        for group in ("mp", "reports"):
            _on_top(bare, group, "global asset graph after dismissing the pop-up")
        assert bare.evaluate(f"window.localStorage.getItem({json.dumps(NUX_STORAGE_KEY)})") == json.dumps("1")
        assert _nux_pending(dagster_dev) is False  # Skip also told the server
        bare.close()
        print("onboarding pop-up: opened without the flag, dismissed, graph on top")


def _find_plot(page):
    """The <img> of the xrd_plot metadata: inline, or behind the UI's '[Show Markdown]' action."""
    sel = "img[src^='data:image/png;base64']"
    if page.locator(sel).count() == 0:
        row = page.locator("tr", has_text="xrd_plot")
        (row if row.count() else page).get_by_text("Show Markdown").last.click()
    img = page.locator(sel).first
    img.wait_for(state="visible")
    return img
