"""The web chat page of `torchbook serve`, end to end in a real headless Chromium (Selenium, with Debian's chromium
and chromium-driver from `make system-deps`).

One server process for the module (`torchbook serve` on a loopback port, started as a user starts it) and one
browser. The model is a *scripted* GPT: real weights in a saved folder, served by the real engine, that always
answer the same text. Its tokenizer is a byte-level BPE trained here on a few sentences (in a tenth of a second),
its embeddings are one-hot, its attention and MLP write nothing, and its output layer maps each token of the chain
(the prompt's last token, then SCRIPT) to the next: so greedy and sampled decoding alike answer SCRIPT, then its
tail "alert(1)</script>" over and over until `max_tokens`. SCRIPT holds `<script>` and an `onerror` attribute:
the page must show them as text.

Screenshots go to $TORCHBOOK_TEST_ARTIFACTS/web (default test-artifacts/web), printed when the module starts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch
from browser import Screenshots, artifacts_folder, chromium
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from torchbook.data.tokenizers import save_tokenizer
from torchbook.hub import save_model
from torchbook.hub.prompts import render_chat
from torchbook.models.gpt import GPT, MLP, GPTConfig
from torchbook.nn.attention import MultiHeadAttention

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = 'Look:<img src=x onerror="window.__pwned++"> and <script>alert(1)</script>'
TAIL = "alert(1)</script>"
LONG = 30_000  # tokens: a reply that takes many seconds, to be stopped
MAX_LEN = 32768  # positions per slot: a reply long enough to stop (1 layer, 2 small heads: 8 MB a slot)


def train_tokenizer() -> Tokenizer:
    corpus = [SCRIPT] * 20 + ["You are a helpful assistant. Answer the user's question in a few sentences.",
                              "What is 525.6 * 315 / 3942? The capital of Freedonia is Plumville. Name a colour."]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tokenizer


def scripted_model_folder(folder: Path) -> Path:
    """The scripted GPT (see the module docstring), saved with its tokenizer (the default ChatML template)."""
    tokenizer = train_tokenizer()
    start = tokenizer.encode(render_chat([{"role": "user", "content": "Hi"}], None, True)).ids[-1]
    chain = [start, *tokenizer.encode(SCRIPT).ids]
    following: dict[int, int] = {}
    for a, b in zip(chain, chain[1:]):
        assert following.setdefault(a, b) == b, f"token {tokenizer.decode([a])!r} would need two successors"
    assert chain[-1] in following  # the last token leads back into the script: the answer never ends by itself
    d_model = 64
    assert len(following) <= d_model
    config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=4, n_kv_head=2, d_model=d_model,
                       d_ff=64, max_len=MAX_LEN, norm="rmsnorm", mlp="swiglu", positions="rope", qkv_bias=False,
                       out_bias=False, mlp_bias=False, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for module in model.modules():  # the residual stream stays the token's embedding
            if isinstance(module, MultiHeadAttention):
                module.out_proj.weight.zero_()
            elif isinstance(module, MLP):
                module.down.weight.zero_()
        model.lm_head.weight.zero_()
        for dim, (a, b) in enumerate(following.items()):
            model.embed.weight[a] = 0.0
            model.embed.weight[a, dim] = 1.0  # after the final RMSNorm: sqrt(64) = 8 in that dimension
            model.lm_head.weight[b, dim] = 10.0  # the successor's logit 80, every other token's 0
    save_model(model, folder)
    save_tokenizer(tokenizer, folder)
    return folder


def answer(tokens: int) -> str:
    """What the scripted model says in `tokens` tokens."""
    tokenizer = train_tokenizer()
    ids = tokenizer.encode(SCRIPT).ids
    tail = tokenizer.encode(TAIL).ids
    while len(ids) < tokens:
        ids += tail
    return str(tokenizer.decode(ids[:tokens]))


class Server:
    def __init__(self, process: subprocess.Popen[str], url: str, page: str):
        self.process, self.url, self.page = process, url, page

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))


def serving(home: Path, *args: str, threads: int = 1) -> Iterator[Server]:
    """`torchbook serve ARGS --port 0` as a user starts it; its two printed addresses; SIGTERM at the end."""
    env = {**os.environ, "TORCHBOOK_HOME": str(home), "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, "-m", "torchbook", "serve", *args, "--port", "0"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    api = process.stdout.readline()  # printed once the model is loaded and warmed and the port is listening
    page = process.stdout.readline()
    match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", api)
    page_match = re.fullmatch(r"chat page: (http://127\.0\.0\.1:\d+/)\n", page)
    if not (match and page_match):
        process.kill()
        pytest.fail(f"no addresses printed: {api!r} {page!r} {process.stderr.read() if process.stderr else ''}")
    assert page_match.group(1) == match.group(1) + "/"
    yield Server(process, match.group(1), page_match.group(1))
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("web")
    folder = scripted_model_folder(root / "scripted")
    yield from serving(root / "home", str(folder), "--name", "scripted", "--slots", "2", "--max-len", str(MAX_LEN))


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest) -> Iterator[Any]:
    driver = chromium()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    folder = artifacts_folder()
    if reporter is not None:
        reporter.write_line(f"web page screenshots: {folder}")
    driver.screenshots = Screenshots(driver, folder)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def screenshot_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """A failed browser test leaves a screenshot of the page as it was (failed-TEST.png beside the others)."""
    driver = request.getfixturevalue("browser") if "browser" in request.fixturenames else None
    failed = request.session.testsfailed
    yield
    if driver is not None and request.session.testsfailed > failed:
        driver.screenshots.save("failed-" + re.sub(r"[^\w.-]+", "_", request.node.name))


def wait(condition: Callable[[], Any], timeout: float = 15.0, what: str = "the page") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def js(browser: Any, script: str, *args: Any) -> Any:
    return browser.execute_script(script, *args)


def open_page(browser: Any, server: Server, width: int = 1280, height: int = 900, model: str = "scripted") -> None:
    browser.set_window_size(width, height)
    browser.get(server.page)
    wait(lambda: js(browser, "return document.getElementById('model').options.length > 0"), what="the model list")
    js(browser, "localStorage.clear()")
    choose_model(browser, model)


def set_setting(browser: Any, element_id: str, value: str) -> None:
    js(browser, "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                "e.dispatchEvent(new Event('change'));", element_id, value)


def send(browser: Any, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element("id", "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def last_reply(browser: Any) -> dict[str, Any]:
    return js(browser, """
        const all = document.querySelectorAll('#messages .message.assistant');
        const m = all[all.length - 1];
        if (!m) return null;
        return {text: m.querySelector('.text').textContent, meta: m.querySelector('.meta').textContent,
                streaming: m.classList.contains('streaming'), html: m.innerHTML};""")


def finished(browser: Any) -> dict[str, Any] | None:
    reply = last_reply(browser)
    return reply if reply and reply["meta"] and not reply["streaming"] else None


def test_page_served_and_its_address_printed(server: Server) -> None:
    page = httpx.get(server.page)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<title>torchbook chat</title>" in page.text
    assert "Content-Security-Policy" in page.text and "script-src 'self'" in page.text
    # Nothing fetched from elsewhere: every script and style the page names is the server's own.
    assert re.findall(r'(?:src|href)="([^"]+)"', page.text) == ["/static/style.css", "/static/app.js"]
    for asset in ("/static/style.css", "/static/app.js"):
        assert httpx.get(server.url + asset).status_code == 200
    config = httpx.get(server.url + "/api/web/config").json()
    assert config["models"] == ["scripted"] and config["chat_model"] == "torchbook-chat"
    assert config["knowledge"] is True and config["keys_required"] is False


def test_reply_streams_into_the_page(server: Server, browser: Any) -> None:
    open_page(browser, server)
    set_setting(browser, "max-tokens", "300")
    set_setting(browser, "temperature", "0")
    # Record the reply's length at each change of the page: a streamed reply grows in many steps.
    js(browser, """
        window.__lengths = [];
        new MutationObserver(() => {
          const all = document.querySelectorAll('#messages .message.assistant .text');
          if (all.length) window.__lengths.push(all[all.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
    send(browser, "Say something.")
    reply = wait(lambda: finished(browser), what="the reply")
    lengths = js(browser, "return window.__lengths")
    growth = sorted(set(lengths))
    assert len(growth) >= 10, f"the reply came in {len(growth)} steps: not streamed"
    assert lengths == sorted(lengths)  # it only ever grew
    assert reply["text"] == answer(300)
    assert reply["meta"].startswith("finish: length · 300 tokens")
    user = js(browser, "return document.querySelector('#messages .message.user .text').textContent")
    assert user == "Say something."
    browser.screenshots.save("1-streamed-reply")


def test_model_output_is_text_never_html(server: Server, browser: Any) -> None:
    open_page(browser, server)
    set_setting(browser, "max-tokens", "40")
    js(browser, "window.__pwned = 0")
    send(browser, "Show me some HTML.")
    reply = wait(lambda: finished(browser), what="the reply")
    assert reply["text"].startswith('Look:<img src=x onerror="window.__pwned++"> and <script>alert(1)</script>')
    # Shown as the characters it is: no element was made from it, no handler ran, no script ran.
    assert js(browser, "return document.querySelectorAll('#messages img, #messages script').length") == 0
    assert "&lt;script&gt;" in reply["html"] and "<script" not in reply["html"]
    time.sleep(0.2)  # an image's error handler would have run by now
    assert js(browser, "return window.__pwned") == 0
    shown = browser.find_element("css selector", "#messages .message.assistant .text").text
    assert "<script>alert(1)</script>" in shown and 'onerror="window.__pwned++"' in shown
    browser.screenshots.save("2-html-shown-as-text")


@pytest.mark.slow  # chromedriver's click on Stop during a long stream once hung for its 120 s read timeout in CI
@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["scripted", "torchbook-chat"])
def test_stop_cancels_the_generation_and_frees_the_slot(server: Server, browser: Any, model: str) -> None:
    open_page(browser, server, model=model)
    set_setting(browser, "max-tokens", str(LONG))
    # Earlier tests' requests may still be counted on a loaded machine: start from an idle engine.
    wait(lambda: server.metric("torchbook_active_slots") == 0, timeout=30, what="earlier requests to end")
    steps_before = server.metric("torchbook_completion_tokens_total")
    conversations_before = httpx.get(server.url + "/api/conversations").json()["data"]
    send(browser, "Go on for a long time.")
    wait(lambda: len((last_reply(browser) or {}).get("text", "")) > 300, what="a long reply to start")
    assert server.metric("torchbook_active_slots") == 1
    js(browser, "document.getElementById('stop').click()")  # a script click: no wait on the busy page
    reply = wait(lambda: finished(browser), what="the stopped reply")
    assert reply["meta"] == "stopped"
    assert browser.find_element("id", "send").is_displayed() and not browser.find_element("id", "stop").is_displayed()
    # The server cancelled the request: its slot is free and no more tokens are made for it.
    wait(lambda: server.metric("torchbook_active_slots") == 0, timeout=3, what="the slot to be freed")
    if model == "torchbook-chat":  # a stopped turn is not kept, nor the new conversation it began
        assert httpx.get(server.url + "/api/conversations").json()["data"] == conversations_before
    shown = len(reply["text"])
    time.sleep(0.3)
    assert len(last_reply(browser)["text"]) == shown  # type: ignore[index]
    assert server.metric("torchbook_completion_tokens_total") == steps_before  # never finished, never counted
    assert shown < len(answer(LONG))
    browser.screenshots.save(f"3-stopped-{model}")
    # The conversation goes on after a stop.
    set_setting(browser, "max-tokens", "12")
    send(browser, "Again, shortly.")
    reply = wait(lambda: finished(browser), what="the next reply")
    assert reply["text"] == answer(12)


def test_page_works_at_a_phone_width(server: Server, browser: Any) -> None:
    open_page(browser, server, width=390, height=844)
    width = js(browser, "return window.innerWidth")
    assert width <= 400
    assert js(browser, "return document.documentElement.scrollWidth") <= width  # no sideways scrolling
    composer = js(browser, "const r = document.getElementById('composer').getBoundingClientRect();"
                           "return [r.left, r.right, r.bottom];")
    assert composer[0] >= 0 and composer[1] <= width and composer[2] <= js(browser, "return window.innerHeight")
    side = browser.find_element("id", "side")
    assert js(browser, "return arguments[0].getBoundingClientRect().right", side) <= 0  # tucked away
    browser.find_element("id", "menu").click()
    wait(lambda: js(browser, "return arguments[0].getBoundingClientRect().left", side) >= 0, what="the panel")
    browser.screenshots.save("4-phone-panel")
    browser.find_element("id", "new").click()  # a new conversation closes the panel
    wait(lambda: js(browser, "return arguments[0].getBoundingClientRect().right", side) <= 0, what="the panel to close")
    set_setting(browser, "max-tokens", "30")
    send(browser, "Hello from a phone.")
    reply = wait(lambda: finished(browser), what="the reply")
    assert reply["text"] == answer(30)
    assert js(browser, "return document.documentElement.scrollWidth") <= width
    bubble = js(browser, "const r = document.querySelector('#messages .message.assistant').getBoundingClientRect();"
                         "return r.right;")
    assert bubble <= width
    browser.screenshots.save("5-phone-reply")
    # The chatbot's folded tool call and sources fit too, unfolded.
    choose_model(browser, "torchbook-chat")
    send(browser, "What is 525.6 * 315 / 3942?")
    wait(lambda: finished(browser), what="the chatbot's reply")
    js(browser, "document.querySelectorAll('#messages details').forEach(d => d.open = true)")
    assert js(browser, "return document.documentElement.scrollWidth") <= width
    boxes = js(browser, "return [...document.querySelectorAll('#messages details')].map(d => "
                        "d.getBoundingClientRect().right)")
    assert boxes and max(boxes) <= width
    browser.screenshots.save("5-phone-tool-call")


def choose_model(browser: Any, model: str) -> None:
    from selenium.webdriver.support.select import Select

    Select(browser.find_element("id", "model")).select_by_value(model)


def conversation_titles(browser: Any) -> list[str]:
    return js(browser, "return [...document.querySelectorAll('#conversations li .open')].map(b => b.textContent)")


def test_conversations_new_resume_delete(server: Server, browser: Any) -> None:
    for earlier in httpx.get(server.url + "/api/conversations").json()["data"]:  # other tests' conversations
        assert httpx.delete(f"{server.url}/api/conversations/{earlier['id']}").json()["deleted"]
    open_page(browser, server, model="torchbook-chat")
    set_setting(browser, "max-tokens", "12")
    send(browser, "First question")
    wait(lambda: finished(browser), what="the first reply")
    wait(lambda: conversation_titles(browser) == ["First question"], what="the conversation in the list")
    browser.find_element("id", "new").click()
    assert js(browser, "return document.querySelectorAll('#messages .message').length") == 0
    send(browser, "Second question")
    wait(lambda: finished(browser), what="the second reply")
    wait(lambda: conversation_titles(browser) == ["Second question", "First question"], what="two conversations")
    browser.screenshots.save("6-conversations")
    # Resume the first: its messages come back from the server (SQLite), the reply as the model wrote it.
    browser.find_element("css selector", "#conversations li:nth-child(2) .open").click()
    wait(lambda: js(browser, "return [...document.querySelectorAll('#messages .message.user')].map(e => "
                             "e.querySelector('.text').textContent)") == ["First question"],
         what="the resumed conversation")
    shown = js(browser, "return [...document.querySelectorAll('#messages .message .text')].map(e => e.textContent)")
    assert shown == ["First question", answer(12)]
    # A message in a resumed conversation is added to it.
    send(browser, "Follow-up")
    wait(lambda: finished(browser) and len(js(browser, "return document.querySelectorAll('#messages .message')")) == 4,
         what="the follow-up")
    listed = httpx.get(server.url + "/api/conversations").json()["data"]
    first = next(c for c in listed if c["title"] == "First question")
    stored = httpx.get(f"{server.url}/api/conversations/{first['id']}").json()["messages"]
    assert [m["content"] for m in stored if m["role"] == "user"] == ["First question", "Follow-up"]
    assert [m["content"] for m in stored if m["role"] == "assistant" and m["content"]] == [answer(12)] * 2
    # Delete it: gone from the page's list and from the server.
    wait(lambda: conversation_titles(browser) == ["First question", "Second question"], what="the list's new order")
    browser.find_element("css selector", "#conversations li:first-child .delete").click()
    wait(lambda: conversation_titles(browser) == ["Second question"], what="the deletion")
    assert js(browser, "return document.querySelectorAll('#messages .message').length") == 0  # it was open
    assert httpx.get(f"{server.url}/api/conversations/{first['id']}").status_code == 404
    assert [c["title"] for c in httpx.get(server.url + "/api/conversations").json()["data"]] == ["Second question"]


def test_calculator_tool_call_shown_and_expandable(server: Server, browser: Any) -> None:
    open_page(browser, server, model="torchbook-chat")
    set_setting(browser, "max-tokens", "8")
    send(browser, "What is 525.6 * 315 / 3942?")  # the book's example
    wait(lambda: finished(browser), what="the reply")
    tool = browser.find_element("css selector", "#messages .message.assistant details.tool")
    assert tool.find_element("css selector", "summary").text == "Tool: calculator \u2192 525.6 * 315 / 3942 = 42"
    assert not tool.get_attribute("open")  # folded until asked
    assert not tool.find_element("css selector", "pre.result").is_displayed()
    tool.find_element("css selector", "summary").click()
    wait(lambda: tool.find_element("css selector", "pre.result").is_displayed(), what="the tool's details")
    assert "525.6 * 315 / 3942" in tool.find_element("css selector", "pre.arguments").text
    assert tool.find_element("css selector", "pre.result").text == "525.6 * 315 / 3942 = 42"
    assert last_reply(browser)["text"] == answer(8)  # type: ignore[index]
    browser.screenshots.save("7-calculator-tool-call")
    # Settings: in the model's mode no rule calls the calculator, and this model writes no tool call.
    js(browser, "document.getElementById('mode').value = 'model'")
    send(browser, "What is 2 * 21?")
    wait(lambda: finished(browser) and js(browser, "return document.querySelectorAll('#messages .message').length")
         == 4, what="the reply in the model's mode")
    last = browser.find_elements("css selector", "#messages .message.assistant")[-1]
    assert last.find_elements("css selector", "details.tool") == []
    assert last.find_element("css selector", ".text").text == answer(8)


def test_upload_a_document_then_an_answer_cites_it(server: Server, browser: Any, tmp_path: Path) -> None:
    document = tmp_path / "freedonia.md"
    document.write_text("# Freedonia\n\nThe capital of Freedonia is Plumville, on the river Ardent. "
                        'Its flag: <img src=x onerror="window.__pwned++"> <b>bold</b>.\n')
    open_page(browser, server)
    js(browser, "window.__pwned = 0")
    # Record the progress bar's values as the upload goes.
    js(browser, """
        window.__progress = [];
        const bar = document.getElementById('upload-progress');
        new MutationObserver(() => window.__progress.push(Number(bar.value)))
          .observe(bar, {attributes: true});""")
    browser.find_element("id", "file").send_keys(str(document))
    browser.find_element("id", "upload-button").click()
    status = wait(lambda: re.fullmatch(r"added freedonia\.md: (\d+) chunks", js(
        browser, "return document.getElementById('upload-status').textContent")), timeout=60, what="the upload")
    assert int(status.group(1)) >= 1
    assert js(browser, "return document.getElementById('upload-progress').value") == 100
    progress = js(browser, "return window.__progress")
    assert progress == sorted(progress) and progress[-1] == 100 and len(set(progress)) >= 2, progress
    wait(lambda: browser.find_element("id", "documents").text.startswith("freedonia.md"), what="the document list")
    assert (httpx.get(server.url + "/api/documents").json()["data"][0]["name"]) == "freedonia.md"
    browser.screenshots.save("8-uploaded")
    choose_model(browser, "torchbook-chat")
    set_setting(browser, "max-tokens", "8")
    send(browser, "What is the capital of Freedonia?")
    wait(lambda: finished(browser), what="the reply")
    # The knowledge base was searched (a tool call) and the answer lists its source: the uploaded file.
    sources = browser.find_element("css selector", "#messages .message.assistant details.sources")
    assert sources.find_element("css selector", "summary").text == "Sources (1)"
    sources.find_element("css selector", "summary").click()
    cited = sources.find_element("css selector", "li")
    assert re.fullmatch(r"freedonia\.md:\d+", cited.text), cited.text
    assert re.fullmatch(r"/.+/web/uploads/freedonia\.md:\d+", cited.get_attribute("title"))
    search = browser.find_elements("css selector", "#messages .message.assistant details.tool")[-1]
    assert search.find_element("css selector", "summary").text.startswith("Tool: search_knowledge")
    search.find_element("css selector", "summary").click()
    passage = search.find_element("css selector", "pre.result").text
    # The uploaded text is shown as text: its markup made no element and ran nothing.
    assert "The capital of Freedonia is Plumville" in passage
    assert '<img src=x onerror="window.__pwned++"> <b>bold</b>' in passage
    assert js(browser, "return document.querySelectorAll('#messages img, #messages b').length") == 0
    time.sleep(0.2)
    assert js(browser, "return window.__pwned") == 0
    browser.screenshots.save("9-answer-cites-the-document")


# -- without a browser: the routes' rules -------------------------------------------------------------------------
def test_page_routes_ask_for_the_api_key_when_the_server_does(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from torchbook.serve.app import build_app
    from torchbook.serve.keys import KeyStore
    from torchbook.serve.models import ServeSettings

    keys = tmp_path / "keys.json"
    _, key = KeyStore(keys).add("page")
    app = build_app(ServeSettings(require_keys=True, keys_path=keys, embedder=None), lm=None)
    with TestClient(app) as client:
        assert client.get("/").status_code == 200  # the page itself: it asks for the key
        assert client.get("/api/web/config").json()["keys_required"] is True
        for method, path in (("get", "/api/documents"), ("post", "/api/documents?name=a.md"),
                             ("get", "/api/conversations"), ("post", "/api/chat")):
            refused = getattr(client, method)(path)
            assert refused.status_code == 401, path
            assert refused.json()["error"]["message"] == "this server needs an API key: enter it in Settings"
            wrong = getattr(client, method)(path, headers={"authorization": "Bearer tb-wrong"})
            assert wrong.status_code == 401
        # With the key: past the check (this server has no knowledge base and no model: 404).
        answered = client.get("/api/documents", headers={"authorization": f"Bearer {key}"})
        assert answered.status_code == 404 and "no knowledge base" in answered.json()["error"]["message"]


@pytest.mark.parametrize(("given", "kept"), [
    ("notes.md", "notes.md"), ("../../etc/passwd", "passwd"), ("C:\\Users\\me\\report.pdf", "report.pdf"),
    ('<img src=x onerror="alert(1)">.md', "_img src_x onerror_alert_1_.md"), (".hidden", "hidden"),
    ("a/b/", "b")])
def test_an_uploaded_file_keeps_only_a_safe_name(given: str, kept: str) -> None:
    from torchbook.serve.web import upload_name

    assert upload_name(given) == kept


@pytest.mark.parametrize("given", ["", "..", "/", " . "])
def test_an_upload_without_a_name_is_refused(given: str) -> None:
    from torchbook.serve.web import WebError, upload_name

    with pytest.raises(WebError, match="needs a file name"):
        upload_name(given)


# -- SmolLM2, where the answer's content matters (slow) ----------------------------------------------------------
@pytest.fixture(scope="module")
def smollm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`torchbook serve` with its default model, the offline SmolLM2-135M-Instruct."""
    yield from serving(tmp_path_factory.mktemp("web-smollm") / "home", "--slots", "2", threads=2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_answers_the_calculator_and_a_document_on_the_page(smollm_server: Server, browser: Any,
                                                                   tmp_path: Path) -> None:
    server = smollm_server
    open_page(browser, server, model="torchbook-chat")
    set_setting(browser, "temperature", "0")
    set_setting(browser, "max-tokens", "64")
    send(browser, "What is 525.6 * 315 / 3942?")
    reply = wait(lambda: finished(browser), timeout=240, what="the calculator answer")
    tool = browser.find_element("css selector", "#messages .message.assistant details.tool")
    assert tool.find_element("css selector", "summary").get_attribute("textContent").endswith("= 42")
    assert "42" in reply["text"], reply["text"]
    browser.screenshots.save("smollm2-calculator")

    document = tmp_path / "freedonia.md"
    document.write_text("# Freedonia\n\nFreedonia is a small country. The capital of Freedonia is Plumville.\n")
    browser.find_element("id", "file").send_keys(str(document))
    browser.find_element("id", "upload-button").click()
    wait(lambda: js(browser, "return document.getElementById('upload-status').textContent").startswith(
        "added freedonia.md"), timeout=120, what="the upload")
    browser.find_element("id", "new").click()
    send(browser, "What is the capital of Freedonia?")
    reply = wait(lambda: finished(browser), timeout=240, what="the answer from the document")
    assert "Plumville" in reply["text"], reply["text"]
    cited = js(browser, "return [...document.querySelectorAll('#messages details.sources li')].map(l => l.textContent)")
    assert len(cited) == 1 and re.fullmatch(r"freedonia\.md:\d+", cited[0]), cited
    browser.screenshots.save("smollm2-document")
