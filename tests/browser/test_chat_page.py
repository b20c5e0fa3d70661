"""The persona chat page at `/` in headless Chromium, against real servers: an open one with three uploaded
adapters, and one with API keys."""

import json
import shutil
from pathlib import Path

import pytest

from adapters import llama_base_shapes, random_adapter, write_peft_folder
from clients.python import LoraplexClient
from tests.integration.server_process import ServerProcess

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Only the system Chromium is used (browser downloads do not work here); nothing may reach the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "test-output" / "chat_page.png"
SMOLLM2_SHAPES = llama_base_shapes(30, 576, 1536, 192)
REPLY_TIMEOUT_MS = 120_000
ADMIN_KEY, TENANT_KEY = "admin-key-0123456789abcdef", "tenant-key-0123456789abcdef"


def upload_personas(url: str, names: tuple[str, ...], root, api_key: str | None = None) -> None:
    with LoraplexClient(url, api_key=api_key) as client:
        for seed, name in enumerate(names, start=1):
            folder = root.mktemp(name)
            write_peft_folder(random_adapter(name, SMOLLM2_SHAPES, seed=seed, init_std=0.05), folder)
            client.upload_adapter(folder, name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("store"))
    proc.start()
    upload_personas(proc.url, ("pirate", "butler", "ghost"), tmp_path_factory)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A server with API keys: an admin, and a tenant who may use the pirate only."""
    root = tmp_path_factory.mktemp("keyed")
    keys = root / "keys.json"
    keys.write_text(json.dumps([{"key": TENANT_KEY, "role": "user", "adapters": ["pirate"]}]))
    proc = ServerProcess(root / "store", env={"LORAPLEX_ADMIN_KEYS": ADMIN_KEY, "LORAPLEX_KEYS_FILE": str(keys)})
    proc.start()
    upload_personas(proc.url, ("pirate", "butler"), tmp_path_factory, api_key=ADMIN_KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("no system Chromium: run `make browser-deps`")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(server, browser):
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    page.goto(server.url + "/")
    expect(page.get_by_label("Persona").locator("option")).to_have_count(4)
    page.get_by_text("Settings").click()
    page.get_by_label("Max new tokens").fill("12")
    page.get_by_label("Temperature").fill("0")
    yield page
    page.close()


def send(page, persona: str, text: str, replies_after: int) -> None:
    page.get_by_label("Persona").select_option(persona)
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".reply:not([data-state=streaming])")).to_have_count(replies_after, timeout=REPLY_TIMEOUT_MS)


def test_persona_switch_keeps_history_and_labels_each_reply(page):
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/generate") else None)
    options = page.get_by_label("Persona").locator("option")
    assert options.first.text_content() == "base model"

    send(page, "pirate", "Who are you?", replies_after=1)
    send(page, "butler", "And who are you?", replies_after=2)

    replies = page.locator(".reply")
    expect(replies.locator(".reply-label")).to_have_text(["pirate", "butler"])
    expect(page.locator(".reply[data-state=done]")).to_have_count(2)
    texts = [replies.nth(i).locator(".message-text").text_content() for i in range(2)]
    assert all(t.strip() for t in texts), texts
    expect(page.locator("#conversation > li")).to_have_count(4)

    assert [b["adapter"] for b in bodies] == ["pirate", "butler"] and all(b["stream"] for b in bodies)
    assert bodies[0]["messages"] == [{"role": "user", "content": "Who are you?"}]
    assert bodies[1]["messages"] == [{"role": "user", "content": "Who are you?"},
                                     {"role": "assistant", "content": texts[0]},
                                     {"role": "user", "content": "And who are you?"}]
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_the_system_prompt_opens_each_request_and_stop_keeps_what_was_written(page):
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/generate") else None)
    # the first reply must still be running when Stop is clicked, whatever the model would write
    page.route("**/generate", lambda route: route.continue_(
        post_data=json.dumps({**route.request.post_data_json, "ignore_eos": True})))
    page.get_by_label("System prompt").fill("You are a patient counter.")
    page.get_by_label("Max new tokens").fill("800")
    page.get_by_label("Persona").select_option("pirate")
    page.get_by_label("Message").fill("Count from 1 to 500, separated by commas.")
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".reply")
    expect(reply.locator(".message-text")).not_to_be_empty(timeout=REPLY_TIMEOUT_MS)
    page.get_by_role("button", name="Stop").click()
    expect(reply).to_have_attribute("data-state", "done")
    expect(reply).to_contain_text("stopped")
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    expect(page.get_by_role("status")).to_have_text("Stopped.")
    assert bodies[0]["messages"] == [{"role": "system", "content": "You are a patient counter."},
                                     {"role": "user", "content": "Count from 1 to 500, separated by commas."}]

    page.unroute("**/generate")
    page.get_by_label("Max new tokens").fill("12")
    send(page, "pirate", "Shorter, please.", replies_after=2)  # the stopped reply stays in the history
    kept = reply.first.locator(".message-text").text_content()
    assert bodies[1]["messages"][2] == {"role": "assistant", "content": kept} and kept


def test_a_blend_of_two_personas_sends_both_with_the_sliders_weights_and_gets_a_reply(page):
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/generate") else None)
    slider = page.get_by_label("Mix weight")
    expect(slider).to_be_disabled()  # nothing to blend with yet
    page.get_by_label("Blend with").select_option("butler")
    expect(slider).to_be_enabled()
    slider.fill("0.25")
    slider.press("ArrowRight")  # one step of 0.05
    expect(page.get_by_test_id("blend-value")).to_have_text("30%")

    send(page, "pirate", "Who are you?", replies_after=1)
    reply = page.locator(".reply")
    expect(reply.locator(".reply-label")).to_have_text("pirate 70% + butler 30%")
    expect(reply).to_have_attribute("data-state", "done")
    assert reply.locator(".message-text").text_content().strip()
    assert bodies[0]["adapters"] == [{"name": "pirate", "weight": 0.7}, {"name": "butler", "weight": 0.3}]
    assert "adapter" not in bodies[0]

    slider.fill("0")  # no share of the second persona: the first alone, by name
    send(page, "pirate", "Again?", replies_after=2)
    page.get_by_label("Blend with").select_option("")
    expect(slider).to_be_disabled()
    slider_value = slider.input_value()
    send(page, "pirate", "Once more?", replies_after=3)
    assert [b.get("adapter") for b in bodies[1:]] == ["pirate", "pirate"] and slider_value == "0"
    assert all("adapters" not in b for b in bodies[1:])
    expect(page.locator(".reply[data-state=done]")).to_have_count(3)


def test_a_deleted_persona_shows_the_error_and_is_left_out_of_history(page, server):
    with LoraplexClient(server.url) as client:
        client.delete_adapter("ghost")
    send(page, "ghost", "Boo?", replies_after=1)
    reply = page.locator(".reply")
    expect(reply).to_have_attribute("data-state", "error")
    expect(page.get_by_role("status")).to_contain_text("adapter_not_found")

    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/generate") else None)
    send(page, "", "Hello?", replies_after=2)
    expect(reply.nth(1).locator(".reply-label")).to_have_text("base")
    assert bodies[0]["adapter"] is None
    assert bodies[0]["messages"] == [{"role": "user", "content": "Hello?"}]


def test_a_server_with_keys_gets_the_key_from_settings_on_every_call(keyed_server, browser):
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    try:
        page.goto(keyed_server.url + "/")
        expect(page.get_by_role("status")).to_contain_text("wants an API key")
        expect(page.get_by_label("Persona").locator("option")).to_have_count(1)  # the base model only

        page.get_by_label("API key").fill("wrong-key-0123456789")
        page.get_by_label("API key").blur()
        expect(page.get_by_role("status")).to_contain_text("refused this API key")

        page.get_by_label("API key").fill(TENANT_KEY)
        page.get_by_label("API key").blur()
        expect(page.get_by_label("Persona").locator("option")).to_have_count(2)  # the tenant's adapter only
        page.get_by_label("Max new tokens").fill("8")
        page.get_by_label("Temperature").fill("0")
        sent = []
        page.on("request", lambda r: sent.append(r.headers.get("authorization")) if r.url.endswith("/generate") else None)
        send(page, "pirate", "Ahoy?", replies_after=1)
        expect(page.locator(".reply")).to_have_attribute("data-state", "done")
        assert sent == [f"Bearer {TENANT_KEY}"]

        page.reload()  # the key stays with the tab
        expect(page.get_by_label("Persona").locator("option")).to_have_count(2)
    finally:
        page.close()


