"""The web console (``/ui/``) in headless Chromium, against the session's e2e stack (Envoy,
ext_proc with its admin API, the mock upstream), driven by Selenium (``tests.e2e.browser``).

What a person sees: signing in; a request made with the openai SDK arriving in the live
activity view and in the usage dashboard, whose numbers are the admin API's for the same
range; an application and its keys made, rotated and revoked (the keys then work, or are
refused, through Envoy); the policy builder pointing at a broken CEL expression's position;
the model catalog and a provider test; a viewer token seeing everything read-only (and the
API refusing its writes). Every page has labelled controls and logs no console error.

The session stack has no ``EXT_PROC_ADMIN_TOKEN``: the module mints an admin token in its
database (as ``POST /v1/tokens`` would), and the viewer token through the API. A full-page
screenshot of each page is kept under ``.artifacts/console/`` (git-ignored).
"""

from __future__ import annotations

import asyncio
import csv
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from ext_proc.auth import admin_tokens
from tests.e2e import browser as browsers
from tests.e2e.conftest import E2E

_UNAVAILABLE = browsers.unavailable()
if _UNAVAILABLE is not None:
    pytest.skip(_UNAVAILABLE, allow_module_level=True)

from selenium.webdriver.common.keys import Keys  # noqa: E402 - only once it is installed
from selenium.webdriver.support.ui import Select  # noqa: E402

from tests.e2e.browser import Browser  # noqa: E402

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts" / "console"
HELLO = [{"role": "user", "content": "Hello there"}]
CARD_FIELDS = ("requests", "total_tokens", "cost_usd", "errors", "denied", "avg_latency_ms")
CONVERGE = 10.0  # seconds for the admin API's process to serve a change (within 1 s)

# Every visible form control without a label, and every button without a name or type.
UNLABELLED = """
const bad = [];
const visible = (el) => el.getClientRects().length > 0;
for (const el of document.querySelectorAll("input, select, textarea")) {
  if (el.type === "hidden" || !visible(el)) continue;
  const named =
    el.labels.length || el.getAttribute("aria-label") || el.getAttribute("aria-labelledby");
  if (!named) bad.push(`${el.tagName.toLowerCase()}[name=${el.name}]`);
}
for (const el of document.querySelectorAll("button")) {
  if (!visible(el)) continue;
  const text = el.textContent.trim();
  if (!el.getAttribute("type")) bad.push(`button without a type: ${text}`);
  if (!(el.getAttribute("aria-label") || text)) bad.push(`button without a name: ${el.outerHTML}`);
}
for (const el of document.querySelectorAll("a")) {
  if (visible(el) && !el.getAttribute("href")) bad.push(`link without href: ${el.textContent}`);
}
return bad;
"""

# The usage table as shown: each row's group key and its cells' values.
TABLE_ROWS = """
const rows = document.querySelectorAll('[data-testid="usage-table"] tbody tr');
return [...rows].map((tr) => ({
  key: JSON.parse(tr.dataset.key),
  values: Object.fromEntries(
    [...tr.querySelectorAll("td[data-col]")].map((td) => [td.dataset.col, td.dataset.value])
  ),
}));
"""
CARDS = """
const cards = document.querySelectorAll('[data-testid="usage-summary"] .card');
return Object.fromEntries([...cards].map((card) => [
  card.dataset.field,
  {value: card.dataset.value, text: card.querySelector(".value").textContent},
]));
"""


@dataclass
class Console:
    """The stack's admin API and console, an admin token, and an application of this
    module's own (with a key) whose requests the tests follow."""

    e2e: E2E
    api: str
    admin_token: str
    app: str
    key: str
    request_ids: list[str] = field(default_factory=list)  # made with ``key``

    @property
    def url(self) -> str:
        return f"{self.api}/ui/"

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.api,
            headers={"authorization": f"Bearer {token or self.admin_token}"},
            timeout=15,
        )

    def fingerprint(self) -> str:
        """The catalog the process serves (``/healthz``, asks no dependency)."""
        return str(httpx.get(f"{self.api}/healthz", timeout=5).json().get("config", ""))

    def converged(self, before: str) -> None:
        """Wait (bounded) until the process serves a catalog other than ``before``."""
        deadline = time.monotonic() + CONVERGE
        while self.fingerprint() == before:
            assert time.monotonic() < deadline, "the change did not reach the process"
            time.sleep(0.02)

    async def chat(self, key: str | None = None, model: str = "gpt-4o-mini") -> str:
        """One chat completion through Envoy; its request id."""
        client = self.e2e.sdk(key=key or self.key)
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=HELLO)
        assert raw.status_code == 200
        request_id = str(raw.headers["x-request-id"])
        if key is None:
            self.request_ids.append(request_id)
        return request_id


@pytest.fixture(scope="module")
async def console(e2e: E2E) -> AsyncIterator[Console]:
    api = f"http://127.0.0.1:{e2e.stack.options.admin_port}"
    suffix = uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(e2e.database_url)
    try:
        token, info = await admin_tokens.create_token(
            conn, f"console-admin-{suffix}", "admin", org=None, created_by="test_console"
        )
    finally:
        await conn.close()
    console = Console(e2e, api, token, f"console-usage-{suffix}", key="")
    with console.client() as client:
        before = console.fingerprint()
        created = client.post("/v1/applications", json={"name": console.app, "org": "e2e"})
        assert created.status_code == 201, created.text
        console.converged(before)
        key = client.post("/v1/keys", json={"app": console.app, "name": "console tests"})
        assert key.status_code == 201, key.text
        console.key = key.json()["key"]
    try:
        yield console
    finally:
        with console.client() as client:
            client.post(f"/v1/tokens/{info.name}/revoke")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driven = Browser(tmp_path_factory.mktemp("console-downloads"), failure_dir=ARTIFACTS)
    try:
        yield driven
    finally:
        driven.close()


@pytest.fixture(autouse=True)
def no_console_errors(browser: Browser) -> Iterator[None]:
    """Every test ends with no new SEVERE entry in the browser's console (script errors,
    failed loads, CSP violations); one a test expects, it takes itself."""
    browser.new_severe()
    yield
    assert browser.new_severe() == []


# --- helpers ----------------------------------------------------------------------------


def signed_out(b: Browser, console: Console) -> None:
    """The console's sign-in form, no token kept (signing out of a session the tab still
    holds from an earlier test)."""
    b.open(console.url)
    b.wait(lambda: b.find_all("#token") or b.find_all('[data-testid="who"]'), "the console")
    if b.find_all('[data-testid="who"]'):
        b.button("Sign out").click()
    b.element("#token")
    assert b.js("return window.sessionStorage.length") == 0


def sign_in(b: Browser, console: Console, token: str) -> None:
    """A fresh tab session signed in with ``token``, on the usage view."""
    signed_out(b, console)
    b.element("#token").send_keys(token, Keys.ENTER)  # the keyboard, as a person would
    b.element('[data-testid="who"]')


def shot(b: Browser, name: str) -> Path:
    return b.screenshot(ARTIFACTS / f"{name}.png")


def labelled(b: Browser) -> None:
    assert b.js(UNLABELLED) == []


def announced(b: Browser, text: str) -> str:
    return b.wait(
        lambda: b.find("#announcer").text if text in b.find("#announcer").text else None,
        f"the announcement {text!r}",
    )


def same(shown: str | None, answered: Any) -> bool:
    """A value as the console holds it (a data-* attribute) against the API's."""
    if answered is None:
        return shown in ("", None)
    if isinstance(answered, str):  # a cost: its exact decimal string
        return shown == answered
    return shown not in ("", None) and float(shown) == float(answered)


def status_of(b: Browser, key_id: str) -> str:
    return str(b.find(f'[data-testid="keys-table"] tr[data-key="{key_id}"] .badge').text)


async def refused(console: Console, key: str, timeout: float = 10.0) -> bool:
    """Whether Envoy refuses ``key`` (401) within ``timeout`` (revocation reaches the
    gateway within a second)."""
    client = console.e2e.sdk(key=key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await client.models.list()
        except openai.AuthenticationError:
            return True
        await asyncio.sleep(0.05)  # the poll's interval
    return False


# --- the flows ----------------------------------------------------------------------------


def test_sign_in(console: Console, browser: Browser) -> None:
    b = browser
    signed_out(b, console)
    assert b.driver.title == "Sign in · Gateway console"
    assert b.js("return document.activeElement.id") == "token"  # type at once
    labelled(b)
    shot(b, "sign-in")

    b.element("#token").send_keys("gwa_not-a-token", Keys.ENTER)
    assert b.text("#login-error") == "That token is unknown, revoked or expired."
    # The refused sign-in is the one console error this test expects (a 401 load).
    expected = b.new_severe()
    assert expected and all("/v1/whoami" in e and "401" in e for e in expected), expected

    sign_in(b, console, console.admin_token)
    who = b.text('[data-testid="who"]')
    assert who.startswith("console-admin-") and "admin" in who
    assert b.find('.sidebar a[aria-current="page"]').get_attribute("data-path") == "usage"
    assert b.find_all('[data-testid="readonly-banner"]') == []
    # Signing out forgets the token (sessionStorage) and shows the form again.
    signed_out(b, console)


async def test_activity_streams_a_request(console: Console, browser: Browser) -> None:
    b = browser
    sign_in(b, console, console.admin_token)
    # Reach the view with the keyboard: focus its link, press Enter.
    b.find('.sidebar a[data-path="activity"]').send_keys(Keys.ENTER)
    state = '[data-testid="stream-state"]'
    b.wait(lambda: b.find(state).text == "live", "the stream to open")
    assert b.js("return document.activeElement.tagName") == "H1"  # focus follows the view
    labelled(b)

    # Filtered on this module's app: another app's request (on the feed once its usage
    # row exists) is not shown, ours is.
    b.wait(
        lambda: b.find_all(f'select[name=app] option[value="{console.app}"]'),
        "the application filter's options",
    )
    Select(b.find("select[name=app]")).select_by_value(console.app)
    b.wait(lambda: b.find(state).text == "live", "the filtered stream to open")
    other = await console.chat(key=console.e2e.api_key)
    await console.e2e.usage_row(other)
    ours = await console.chat()
    row = await console.e2e.usage_row(ours)
    shown = b.element(f'tr[data-request-id="{ours}"]')
    cells = [td.text for td in shown.find_elements("css selector", "td")]
    assert cells[2] == console.app
    assert cells[3].startswith("gpt-4o-mini")
    assert cells[4] == "allowed"
    assert cells[6] == "200"
    assert cells[7] == f"{row['total_tokens']:,}"
    assert cells[9].endswith(" ms")
    assert b.find_all(f'tr[data-request-id="{other}"]') == []

    # Paused: a new request is held (and counted), shown on resume.
    b.find('[data-testid="pause"]').click()
    assert b.find('[data-testid="pause"]').get_attribute("aria-pressed") == "true"
    held = await console.chat()
    b.wait(lambda: b.find(".held").text == "1 new while paused", "the held request")
    assert b.find_all(f'tr[data-request-id="{held}"]') == []
    b.button("Resume").click()
    b.element(f'tr[data-request-id="{held}"]')
    rows = b.find_all('[data-testid="activity-rows"] tr')
    assert [r.get_attribute("data-request-id") for r in rows] == [held, ours]  # newest first
    shot(b, "activity")


async def test_usage_dashboard_matches_the_api(console: Console, browser: Browser) -> None:
    b = browser
    await console.chat(model="priced-4o")  # a catalog price: a cost to add up
    for request_id in console.request_ids:
        await console.e2e.usage_row(request_id)
    conn = await asyncpg.connect(console.e2e.database_url)
    try:
        ours = await conn.fetchrow(
            "SELECT count(*) AS requests, sum(total_tokens) AS tokens, sum(cost_usd) AS cost "
            "FROM usage_records WHERE app_id = $1",
            console.app,
        )
    finally:
        await conn.close()
    assert ours["requests"] == len(console.request_ids)

    sign_in(b, console, console.admin_token)
    b.element('[data-testid="usage-summary"] .card')
    Select(b.element("select[name=table]")).select_by_value("app_id")
    mine = f"""tr[data-key='{json.dumps([console.app])}']"""
    b.element(f'[data-testid="usage-table"][data-by="app_id"] {mine}')
    labelled(b)
    # Every request of ours is on the first page shown, the last one made well within the
    # second the page loaded in too (the range ends after now; see the next test).
    first = {tuple(r["key"]): r["values"] for r in b.js(TABLE_ROWS)}
    assert int(first[(console.app,)]["requests"]) == ours["requests"]

    def mismatches() -> list[str]:
        """What the page shows that GET /v1/usage does not answer for the same range."""
        table = b.find('[data-testid="usage-table"]')
        since, until = table.get_attribute("data-since"), table.get_attribute("data-until")
        summary = b.find('[data-testid="usage-summary"]')
        assert (summary.get_attribute("data-since"), summary.get_attribute("data-until")) == (
            since,
            until,
        )
        with console.client() as client:
            answers = [
                client.get("/v1/usage", params={"by": by, "since": since, "until": until})
                for by in ("", "app_id")
            ]
        for answer in answers:
            assert answer.status_code == 200, answer.text
        totals = (answers[0].json()["rows"] or [{}])[0]
        rows = {(r["app_id"],): r for r in answers[1].json()["rows"]}
        cards = b.js(CARDS)
        wrong = [
            f"card {name}: {cards[name]} != {totals.get(name)}"
            for name in CARD_FIELDS
            if not same(cards[name]["value"], totals.get(name))
        ]
        wrong += [
            f"card {name} reads {cards[name]['text']}"
            for name in ("requests", "total_tokens")
            if cards[name]["text"] != f"{totals.get(name, 0):,}"
        ]
        shown = {tuple(r["key"]): r["values"] for r in b.js(TABLE_ROWS)}
        if set(shown) != set(rows):
            wrong.append(f"table rows {sorted(shown)} != {sorted(rows)}")
        for key, row in rows.items():
            for name, value in shown.get(key, {}).items():
                if not same(value, row.get(name)):
                    wrong.append(f"{key} {name}: {value} != {row.get(name)}")
        # And both count every row of our application, after a refresh too.
        api_requests = rows.get((console.app,), {}).get("requests")
        if api_requests is None or int(api_requests) != ours["requests"]:
            wrong.append(
                f"GET /v1/usage: {api_requests} requests of our app, rows: {ours['requests']}"
            )
        return wrong

    last: list[str] = []

    def agree() -> bool:
        # A usage row written late (another test's) may land in the range between the
        # page's query and ours: refresh and compare again, bounded.
        last[:] = mismatches()
        if not last:
            return True
        b.button("Refresh").click()
        b.wait(lambda: b.find("main").get_attribute("aria-busy") is None, "the refresh")
        return False

    try:
        b.wait(agree, "the dashboard to match GET /v1/usage", timeout=20)
    except browsers.BrowserError:
        raise AssertionError(f"the dashboard is not GET /v1/usage's: {last}") from None

    # Our application's row is exactly its requests.
    values = b.js(TABLE_ROWS)
    (row,) = [r["values"] for r in values if r["key"] == [console.app]]
    assert int(row["requests"]) == ours["requests"]
    assert int(row["total_tokens"]) == ours["tokens"]
    assert Decimal(row["cost_usd"]) == ours["cost"] > 0

    # The table exports as CSV, the same rows.
    b.clear_downloads()
    b.button("Export CSV").click()
    exported = b.downloaded(".csv")
    with exported.open(newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert {line["app_id"]: line["requests"] for line in lines} == {
        r["key"][0]: r["values"]["requests"] for r in values
    }
    announced(b, "as CSV")
    shot(b, "usage")


async def test_usage_dashboard_shows_a_request_made_in_the_second_it_loads(
    console: Console, browser: Browser
) -> None:
    """The page asks for a range in whole seconds that ends after now: a request that
    started at hh:mm:ss.5 is on a page loaded at hh:mm:ss.7 (a range ending at now
    floored to the second, hh:mm:ss, left it out). The page's clock is set, and the
    request's row written with its start time, so nothing depends on timing."""
    b = browser
    app = f"console-clock-{uuid.uuid4().hex[:8]}"
    second = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    started = second + timedelta(milliseconds=500)
    conn = await asyncpg.connect(console.e2e.database_url)
    try:
        await conn.execute(
            "INSERT INTO usage_records (request_id, created_at, org_id, app_id, model, "
            "status_code, prompt_tokens, completion_tokens, total_tokens, recorded_by) "
            "VALUES ($1, $2, 'e2e', $3, 'gpt-4o-mini', 200, 7, 3, 10, 'access_log')",
            f"{app}-request",
            started,
            app,
        )
        sign_in(b, console, console.admin_token)
        Select(b.element("select[name=table]")).select_by_value("app_id")
        b.element('[data-testid="usage-table"][data-by="app_id"]')
        summary = '[data-testid="usage-summary"]'
        before = b.find(summary).get_attribute("data-until")
        # 200 ms after that request started, by the page's clock.
        b.js(
            "const at = arguments[0]; Date.now = () => at;", round(started.timestamp() * 1000) + 200
        )
        b.button("Refresh").click()
        # Set with the table in one pass (the table is absent when the range is empty).
        until = b.wait(
            lambda: (u := b.find(summary).get_attribute("data-until")) != before and u,
            "the refresh",
        )
        shown = {tuple(r["key"]): r["values"] for r in b.js(TABLE_ROWS)}
        assert (app,) in shown, f"the request of {started} is not in the range ending {until}"
        assert int(shown[(app,)]["requests"]) == 1
        assert int(shown[(app,)]["total_tokens"]) == 10
        assert datetime.fromisoformat(until) == second + timedelta(seconds=1)
    finally:
        try:
            await conn.execute("DELETE FROM usage_records WHERE app_id = $1", app)
        finally:
            await conn.close()
        signed_out(b, console)  # a new page: its own clock again


async def test_application_and_keys(console: Console, browser: Browser) -> None:
    b = browser
    name = f"console-app-{uuid.uuid4().hex[:6]}"
    sign_in(b, console, console.admin_token)
    b.go("apps", '[data-testid="apps-table"]')
    b.click('[data-testid="new-app"]')
    form = '[data-testid="create-app-form"]'
    b.type(f"{form} input[name=name]", name)
    Select(b.element(f"{form} select[name=org]")).select_by_value("e2e")
    Select(b.element(f"{form} .policy-editor select")).select_by_value("generous")
    b.button("Add", within=form).click()
    b.element(f'{form} li[data-policy="generous"]')
    labelled(b)
    before = console.fingerprint()
    b.button("Create application", within=form).click()
    announced(b, f"Created application {name}.")
    b.element(f'[data-testid="apps-table"] tr[data-app="{name}"].selected')
    assert b.text(".detail h2") == f"Application {name}"
    with console.client() as client:
        app = client.get(f"/v1/applications/{name}").json()
    assert (app["org"], app["policies"], app["managed_by"]) == ("e2e", ["generous"], "api")
    console.converged(before)

    # A key: shown once, with a copy button; it works through Envoy.
    keys = '[data-testid="create-key-form"]'
    b.type(f"{keys} input[name=key_name]", "ci")
    b.button("Create key", within=keys).click()
    secret = b.element('[data-testid="secret-value"]').get_attribute("value")
    assert secret.startswith("gwk_")
    copy = b.button("Copy", within="dialog")
    assert copy.get_attribute("type") == "button"
    copy.click()
    b.wait(lambda: b.find("dialog .copy-status").text, "the copy's outcome")
    assert b.find("dialog .copy-status").text in (
        "Copied to the clipboard.",
        "Selected: press Ctrl+C (⌘C) to copy.",
    )
    labelled(b)
    shot(b, "apps-new-key")
    b.button("I have copied it", within="dialog").click()
    b.wait(lambda: not b.find_all("dialog"), "the dialog to close")
    (first,) = b.wait(lambda: b.find_all('[data-testid="keys-table"] tbody tr'), "the key")
    first_id = first.get_attribute("data-key")
    assert status_of(b, first_id) == "active"
    assert secret not in b.driver.page_source  # shown once: gone with the dialog
    assert await console.chat(key=secret)

    # Rotated with a grace period: a new key; both work meanwhile.
    b.element(f'button[aria-label="Rotate key {first_id}"]').click()
    b.type("dialog input[name=grace_period]", "1h")
    b.button("Rotate", within="dialog").click()
    rotated = b.element('[data-testid="secret-value"]').get_attribute("value")
    assert rotated.startswith("gwk_") and rotated != secret
    assert "The old key works until" in b.text("dialog .warning")
    b.button("I have copied it", within="dialog").click()
    b.wait(lambda: len(b.find_all('[data-testid="keys-table"] tbody tr')) == 2, "two keys")
    second_id = next(
        r.get_attribute("data-key")
        for r in b.find_all('[data-testid="keys-table"] tbody tr')
        if r.get_attribute("data-key") != first_id
    )
    assert (status_of(b, first_id), status_of(b, second_id)) == ("rotating", "active")
    assert await console.chat(key=secret) and await console.chat(key=rotated)

    # Revoked (after a confirmation): listed as revoked, refused by the gateway.
    b.element(f'button[aria-label="Revoke key {second_id}"]').click()
    b.button("Revoke key", within="dialog").click()
    announced(b, f"Revoked key {second_id}.")
    b.wait(lambda: len(b.find_all('[data-testid="keys-table"] tbody tr')) == 1, "one active key")
    b.click("input[name=all]")
    b.wait(lambda: len(b.find_all('[data-testid="keys-table"] tbody tr')) == 2, "every key")
    assert status_of(b, second_id) == "revoked"
    assert await refused(console, rotated)
    shot(b, "apps")


def test_policy_builder_validates_cel(console: Console, browser: Browser) -> None:
    b = browser
    name = f"console-cel-{uuid.uuid4().hex[:6]}"
    sign_in(b, console, console.admin_token)
    b.go("policies", '[data-testid="policy-builder"]')
    builder = '[data-testid="policy-builder"]'
    kind = Select(b.element(f"{builder} [data-testid=policy-type]"))
    kind.select_by_value("rate_limit")  # the form follows the type
    b.element(f"{builder} input[name=requests]")
    kind.select_by_value("custom_cel")
    editor = b.element('[data-testid="cel-pre_check_expression"]')
    assert b.find_all(f"{builder} input[name=requests]") == []
    with console.client() as client:
        types = {t["type"]: t for t in client.get("/v1/policy-types").json()["data"]}
    variables = [
        chip.find_element("css selector", "code").text
        for chip in b.find_all('.cel-field[data-field="pre_check_expression"] .chip')
    ]
    assert variables == list(types["custom_cel"]["cel_variables"]["pre_check_expression"])

    b.type(f"{builder} input[name=name]", name)
    broken = "estimated_tokens < 4000 &&\n  model =="
    editor.send_keys(broken)
    error = '[data-testid="cel-error-pre_check_expression"]'
    b.wait(lambda: b.find(error).text.startswith("Line 2, column 11:"), "the CEL error")
    with console.client() as client:
        answer = client.post(
            "/v1/policies/validate",
            json={"name": name, "type": "custom_cel", "pre_check_expression": broken},
        ).json()
    (problem,) = answer["errors"]
    assert (problem["line"], problem["column"]) == (2, 11)  # what the page says
    assert problem["message"] in b.find(error).text
    assert b.text('[data-testid="policy-verdict"]') == "1 problem to fix."
    assert b.find('[data-testid="cel-mark-pre_check_expression"]').is_displayed()
    labelled(b)
    shot(b, "policies")
    b.button("Go to error").click()  # the caret goes to the position
    at = len("estimated_tokens < 4000 &&\n") + 10
    assert b.js(
        "const t = document.activeElement; return [t.dataset.testid, t.selectionStart]"
    ) == ["cel-pre_check_expression", at]

    editor.send_keys(' "gpt-4o-mini"')
    b.wait(lambda: b.find('[data-testid="policy-verdict"]').text == "Valid.", "a valid policy")
    assert not b.find(error).is_displayed()
    b.click('[data-testid="save-policy"]')
    announced(b, f"Created policy {name}.")
    b.element(f'[data-testid="policies-table"] tr[data-policy="{name}"]')
    with console.client() as client:
        saved = client.get(f"/v1/policies/{name}").json()
    assert saved["pre_check_expression"] == 'estimated_tokens < 4000 &&\n  model == "gpt-4o-mini"'


def test_models_and_provider_test(console: Console, browser: Browser) -> None:
    b = browser
    sign_in(b, console, console.admin_token)
    b.go("models", '[data-testid="models-table"]')
    with console.client() as client:
        models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    rows = b.find_all('[data-testid="models-table"] tbody tr')
    assert {r.get_attribute("data-model") for r in rows} == set(models)
    for row in rows:
        provider = row.find_elements("css selector", "td")[0].text.splitlines()[0]
        assert provider == models[row.get_attribute("data-model")]["provider"]
    priced = b.find('[data-testid="models-table"] tr[data-model="priced-4o"]').text
    assert "in $2.5 · cached $1.25 · out $10" in priced
    labelled(b)

    b.element('button[aria-label="Test provider mock"]').click()
    status = '[data-testid="providers-table"] td[data-status="mock"]'
    b.wait(lambda: b.find(status).text.startswith("ok"), "the provider test")
    text = b.find(status).text
    assert text.startswith("ok HTTP 200 · ") and text.endswith(" ms"), text
    model_status = '[data-testid="models-table"] tr[data-model="gpt-4o-mini"] td[data-status]'
    assert b.find(model_status).text == text  # each model shows its provider's test
    announced(b, "Provider mock: ok")
    shot(b, "models")


def test_viewer_is_read_only(console: Console, browser: Browser) -> None:
    b = browser
    with console.client() as client:
        made = client.post(
            "/v1/tokens", json={"name": f"console-viewer-{uuid.uuid4().hex[:6]}", "role": "viewer"}
        )
    assert made.status_code == 201, made.text
    viewer = made.json()["token"]
    # The API refuses a viewer's writes, whatever the page shows.
    with console.client(viewer) as client:
        assert client.get("/v1/applications").status_code == 200
        for path, body in (
            ("/v1/applications", {"name": "viewer-app", "org": "e2e"}),
            ("/v1/keys", {"app": console.app}),
            ("/v1/policies", {"name": "viewer-policy", "type": "rate_limit", "requests": 1}),
            ("/v1/providers/mock/test", None),
        ):
            refused = client.post(path, json=body)
            assert refused.status_code == 403, (path, refused.text)
            assert refused.json()["error"]["code"] == "forbidden_role"

    sign_in(b, console, viewer)
    assert "viewer" in b.text('[data-testid="who"]')
    assert "Read-only" in b.text('[data-testid="readonly-banner"]')

    def writable() -> list[str]:
        """Controls that change something and are not disabled."""
        return list(
            b.js(
                """
                const out = [];
                for (const el of document.querySelectorAll('[data-write="true"]')) {
                  const controls = el.matches("form")
                    ? el.querySelectorAll("input, select, textarea, button")
                    : [el];
                  for (const c of controls) if (!c.disabled) out.push(c.name || c.textContent);
                }
                return out;
                """
            )
        )

    b.go("apps", '[data-testid="apps-table"]')
    assert not b.find('[data-testid="new-app"]').is_enabled()
    b.element(f'[data-testid="apps-table"] tr[data-app="{console.app}"] button').click()
    b.element('[data-testid="keys-table"] tbody tr')
    rotate = b.find('[data-testid="keys-table"] button[aria-label^="Rotate key"]')
    revoke = b.find('[data-testid="keys-table"] button[aria-label^="Revoke key"]')
    assert not rotate.is_enabled() and not revoke.is_enabled()
    assert b.find_all('[data-write="true"]') and writable() == []
    labelled(b)
    shot(b, "viewer-apps")

    b.go("models", '[data-testid="models-table"]')
    assert b.find_all('[data-write="true"]') and writable() == []
    b.go("policies", '[data-testid="policy-builder"]')
    assert not b.find('[data-testid="save-policy"]').is_enabled()
    b.element('button[aria-label="Open generous in the builder"]').click()
    b.wait(lambda: "Policy generous" in b.text("#builder-title"), "the policy")
    assert writable() == []
    # A viewer may still check an expression: validation only reads.
    b.wait(lambda: b.find('[data-testid="policy-verdict"]').text == "Valid.", "the verdict")


def test_every_page_is_labelled_and_error_free(console: Console, browser: Browser) -> None:
    b = browser
    sign_in(b, console, console.admin_token)
    for view, ready in (
        ("usage", '[data-testid="usage-summary"] .card'),
        ("apps", '[data-testid="apps-table"]'),
        ("models", '[data-testid="models-table"]'),
        ("policies", '[data-testid="policy-builder"] .cel-field'),
        ("activity", '[data-testid="stream-state"].live'),
    ):
        b.go(view, ready)
        labelled(b)
        # Nothing is wider than the 1280 px window (tables scroll inside their panel).
        assert b.js("return document.documentElement.scrollWidth <= window.innerWidth")
    # The console's files carry the strict CSP (no inline script, no other origin).
    answer = httpx.get(console.url, timeout=5)
    assert "script-src 'self'" in answer.headers["content-security-policy"]
