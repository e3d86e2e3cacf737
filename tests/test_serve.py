"""sample.py --serve (minprefix/serve.py): the stepping API it decodes with, its batches in process, then the real
server in a subprocess called over plain HTTP as users call it, and its page in headless Chromium."""
import asyncio
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import EOT, REPO

pytest.importorskip("starlette", reason="the server's packages: pip install -e \".[serve]\"")

from minprefix import Tokenizer, fast  # noqa: E402
from minprefix.generate import collect, decode, pad_left, start  # noqa: E402
from minprefix.guidance import DEFAULT_ANCHOR, DEFAULT_STRENGTH, guide  # noqa: E402
from minprefix.method import build  # noqa: E402
from minprefix.serve import BadRequest, Engine, Job, mix_weights  # noqa: E402

LABELS = ["positive", "negative"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def prefix_file(offline_model, tok, tmp_path_factory):
    """A K/V prefix whose labels start from the keys and values of words of their tone (as build() starts each from
    its label's name): no training, and the two already write differently. Saved with the package's own save."""
    path = tmp_path_factory.mktemp("serve") / "prefix.safetensors"
    method = build("kv", offline_model, LABELS, tok, prefix_len=4)
    words = [tok.encode(" wonderful, great, superb")[:4], tok.encode(" awful, boring, worst")[:4]]
    method.init_from_tokens(offline_model, torch.tensor(words))
    method.save(path, offline_model, LABELS)
    return path


@pytest.fixture(scope="module")
def engine(offline_model, prefix_file):
    from minprefix.method import load
    method, meta = load(prefix_file, offline_model)
    e = Engine(offline_model, method, meta, prefix_file, batch_size=16)
    yield e
    e.close()


def decode_together(engine, *bodies):
    """Each body's texts, all bodies decoded as one batch (engine.decode called here, not by its worker)."""
    loop = asyncio.new_event_loop()
    jobs = [Job(engine.rows(b)[0], False, loop) for b in bodies]
    with torch.no_grad():
        engine.decode(jobs)
    loop.close()
    return [[r.text for r in job.rows] for job in jobs]


# ---- the stepping API: generate.start and fast.start ----

def test_start_fast_equals_reference_step_by_step(offline_model, prefix_file, tok):
    """The first logits and each step's, for left-padded rows each with its own mix: fast.start (static cache, the
    prompt's last position only) against generate.start."""
    from minprefix.method import load
    method, _ = load(prefix_file, offline_model)
    idx, real = pad_left([[EOT] + tok.encode("The film was"), [EOT], [EOT] + tok.encode("I")], EOT)
    weights = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    run, cache = method.apply(offline_model, weights)
    want_n, want, want_step = start(run, idx, 6, kv_cache=cache, real=real)
    n, got, step = fast.start(run, idx, 6, kv_cache=cache, real=real)
    assert n == want_n == 6
    for _ in range(n - 1):
        # float32 products summed in another order (the static cache's attention, the last position's lm_head)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        x = want.argmax(-1, keepdim=True)
        with torch.no_grad():
            want, got = want_step(x), step(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_stream_is_start_then_decode(offline_model, tok):
    """stream(), now built on start(), writes what start's logits and steps give when sampled by decode()."""
    idx, real = pad_left([[EOT] + tok.encode("A long time"), [EOT]], EOT)
    from minprefix.generate import stream
    for stream_, start_ in ((stream, start), (fast.stream, fast.start)):
        want = collect(stream_(offline_model, idx, 8, real=real, temperature=0.9, seed=3, eot=EOT), 2, EOT)
        n, logits, step = start_(offline_model, idx, 8, real=real)
        with torch.no_grad():
            got = collect(decode(logits, step, n, 0.9, None, None, EOT, seed=3), 2, EOT)
        assert got == want


def test_fast_probabilities_equal_the_reference_on_the_models_own_logits(offline_model, tok):
    """fast.probabilities (the nucleus among the likeliest 1,024 tokens, a sort where it reaches past them) against
    generate.probabilities, exactly: rows of both kinds, with and without top_k."""
    from minprefix.generate import probabilities
    texts = ["The film was a", "I have never seen anything like this, and I", "", "Worst. Movie. Ever"]
    idx, real = pad_left([[EOT] + tok.encode(t) for t in texts], EOT)
    with torch.no_grad():
        logits = offline_model(idx, None, real)[real]  # (N, V): every real position's next-token logits
    wide = 0
    for temperature, top_k, top_p in ((0.8, None, 0.9), (1.0, None, 0.95), (0.7, 40, 0.8), (1.2, None, 0.5)):
        want = probabilities(logits, temperature, top_k, top_p)
        assert torch.equal(fast.probabilities(logits, temperature, top_k, top_p), want)
        wide += int(((want > 0).sum(-1) > 1024).sum())
        g, h = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        assert torch.equal(torch.multinomial(want, 1, generator=g),
                           torch.multinomial(fast.probabilities(logits, temperature, top_k, top_p), 1, generator=h))
    assert 0 < wide < 4 * len(logits)  # both ways were taken


# ---- batches, in process ----

def test_mix_weights_go_by_label_name():
    assert mix_weights(["positive", "negative"], alpha=0.8)[0].tolist() == pytest.approx([0.8, 0.2])
    assert mix_weights(["negative", "positive"], alpha=0.8)[0].tolist() == pytest.approx([0.2, 0.8])
    assert mix_weights(["a", "b", "c"], weights={"c": 1.0}).tolist() == [[0.0, 0.0, 1.0]]
    assert mix_weights(["a", "b"], label="b").tolist() == [[0.0, 1.0]]
    for kw, says in (({"alpha": 0.5}, "positive"), ({"label": "d"}, "unknown label 'd'"),
                     ({"weights": {"d": 1}}, "unknown label 'd'"), ({"weights": [1]}, "1 weights for 3 labels")):
        with pytest.raises(ValueError, match=says):
            mix_weights(["a", "b", "c"], **kw)


def test_rows_decoded_together_write_what_each_writes_alone(engine):
    """Greedy: different prompts (so left padding) and mixes in one batch, each row as it would be alone."""
    bodies = [{"prompt": "The film", "alpha": 1.0, "max_tokens": 12, "temperature": 0},
              {"prompt": "", "alpha": 0.0, "max_tokens": 7, "temperature": 0},
              {"prompt": "It was one of those days when", "weights": [0.2, 0.8], "max_tokens": 10, "temperature": 0}]
    together = decode_together(engine, *bodies)
    alone = [decode_together(engine, b)[0] for b in bodies]
    assert together == alone
    assert together[0] != decode_together(engine, dict(bodies[0], alpha=0.0))[0]  # the mix matters


def test_a_seeded_request_writes_the_same_whatever_shares_its_batch(engine, offline_model, tok):
    """Each row samples with its own generator (seed + its choice index): the same text alone, beside rows with
    other settings, and as sample.py's stream() writes it for that seed (one row)."""
    body = {"prompt": "The film", "alpha": 0.7, "max_tokens": 15, "temperature": 0.9, "top_p": 0.9, "seed": 5}
    alone = decode_together(engine, body)[0]
    crowd = decode_together(engine, {"prompt": "Nothing", "max_tokens": 20, "temperature": 1.3, "seed": 1},
                            body, {"prompt": "Yes", "max_tokens": 9, "temperature": 0, "n": 2})[1]
    assert crowd == alone
    run, cache = guide(engine.method, offline_model, mix_weights(LABELS, alpha=0.7), DEFAULT_STRENGTH,
                       DEFAULT_ANCHOR, EOT)  # the server's default guidance, as sample.py's
    idx = torch.tensor([[EOT] + tok.encode("The film")])
    want = collect(fast.stream(run, idx, 15, kv_cache=cache, temperature=0.9, top_p=0.9, seed=5, eot=EOT), 1, EOT)
    assert alone == [tok.decode(want[0])]
    two = decode_together(engine, dict(body, n=2))[0]  # n rows: seeds 5 and 6
    assert two[0] == alone[0] and two[1] != two[0]


def test_stop_strings_cut_the_text_and_are_never_streamed(engine):
    full = decode_together(engine, {"prompt": "The film", "alpha": 1.0, "max_tokens": 30, "temperature": 0})[0][0]
    stop = full[10:14]  # a stop string inside what it writes
    loop = asyncio.new_event_loop()
    job = Job(engine.rows({"prompt": "The film", "alpha": 1.0, "max_tokens": 30, "temperature": 0, "stop": [stop],
                           "stream": True})[0], True, loop)
    with torch.no_grad():
        engine.decode([job])
    loop.run_until_complete(asyncio.sleep(0))  # the worker's call_soon_threadsafe deliveries
    streamed = ""
    while not job.events.empty():
        kind, payload = job.events.get_nowait()
        if kind == "pieces":
            streamed += "".join(text for _, text, _ in payload)
    loop.close()
    cut = full[:full.index(stop)]
    assert job.rows[0].text == streamed == cut and job.rows[0].finish == "stop"


def test_the_reference_path_serves_the_same_text(offline_model, prefix_file, engine, monkeypatch):
    from minprefix.method import load
    monkeypatch.setenv("MINPREFIX_REFERENCE", "1")  # what sample.py --serve --reference sets
    method, meta = load(prefix_file, offline_model)
    reference = Engine(offline_model, method, meta, prefix_file)
    assert reference.start_decoding is start and engine.start_decoding is fast.start
    bodies = [{"prompt": "The film", "alpha": 0.2, "max_tokens": 10, "temperature": 0},
              {"prompt": "", "alpha": 0.9, "max_tokens": 10, "temperature": 0}]
    try:
        assert decode_together(reference, *bodies) == decode_together(engine, *bodies)
    finally:
        reference.close()


def test_the_window_is_the_ceiling_on_max_tokens(engine, tok):
    ids = 1 + len(tok.encode("The film"))  # <|endoftext|> + the prompt
    room = 1024 - 4 - ids + 1
    assert engine.room(ids) == room
    assert len(engine.rows({"prompt": "The film", "max_tokens": room})[0]) == 1
    with pytest.raises(BadRequest) as e:
        engine.rows({"prompt": "The film", "max_tokens": room + 1})
    assert e.value.param == "max_tokens" and f"at most {room}" in e.value.message


# ---- the real server, over HTTP ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, tmp):
        self.port = free_port()
        self.log = open(tmp / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "sample.py"), "--serve", "--port", str(self.port),
                                      *map(str, args)], cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            try:
                if self.get("/v1/models")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not come up:\n{self.output()}")
            time.sleep(0.5)

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)

    def get(self, path):
        c = self.connection()
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def post(self, body, raw=None):  # -> (status, parsed JSON)
        c = self.connection()
        try:
            c.request("POST", "/v1/completions", body=raw if raw is not None else json.dumps(body),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, json.loads(r.read())
        finally:
            c.close()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(prefix_file, offline_model_dir, tmp_path_factory):
    s = Server("--prefix", prefix_file, "--model", offline_model_dir, tmp=tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


def sse(server, body):
    """-> (the events' data lines, in order) of a streamed request."""
    c = server.connection()
    c.request("POST", "/v1/completions", body=json.dumps(dict(body, stream=True)),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.read().decode().split("\n\n") if line]
    c.close()
    return events


@pytest.mark.slow
def test_greedy_text_equals_sample_py(server, prefix_file, offline_model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    for prompt, alpha, guidance, anchor, penalty in (("The film", 0.25, 0, "bare", 0), ("", 1.0, 0, "bare", 0),
                                                     ("The film", 0.0, 2.0, "bare", 0), ("The plot", 1.0, 1.5, "mix", 0),
                                                     ("The film", 0.0, 1.0, "bare", 1.5)):
        p = subprocess.run([sys.executable, str(REPO / "sample.py"), "--prefix", str(prefix_file), "--model",
                            str(offline_model_dir), "--prompt", prompt, "--alpha", str(alpha), "--temperature", "0",
                            "--n", "1", "--max-new-tokens", "20", "--output", str(out), "--guidance", str(guidance),
                            "--guide-from", anchor, "--frequency-penalty", str(penalty)],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        want = json.loads(out.read_text())["text"]
        status, got = server.post({"prompt": prompt, "alpha": alpha, "max_tokens": 20, "temperature": 0,
                                   "guidance": guidance, "guide_from": anchor, "frequency_penalty": penalty})
        assert status == 200, got
        assert got["choices"][0]["text"] == want and len(got["choices"]) == 1
        assert got["usage"]["prompt_tokens"] == 1 + len(Tokenizer().encode(prompt))
        assert got["weights"] == {"positive": alpha, "negative": 1 - alpha}


@pytest.mark.slow
def test_streaming_sends_events_ending_in_done(server):
    body = {"prompt": "The film", "alpha": 0.0, "max_tokens": 15, "temperature": 0.8, "seed": 2, "n": 2}
    events = sse(server, body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    streamed = {0: "", 1: ""}
    for c in chunks:
        streamed[c["choices"][0]["index"]] += c["choices"][0]["text"]
    finishes = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finishes) == [0, 1]  # each choice ends once
    status, whole = server.post(body)
    assert status == 200 and [c["text"] for c in whole["choices"]] == [streamed[0], streamed[1]]
    usage = json.loads(sse(server, dict(body, stream_options={"include_usage": True}))[-2])
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


@pytest.mark.slow
def test_eight_concurrent_clients_each_get_their_own_answer(server):
    bodies = [{"prompt": p, "alpha": a, "max_tokens": 16 + 2 * i, "temperature": 0}
              for i, (p, a) in enumerate(zip(["The film", "I", "This is", "", "Worst", "Best", "The plot", "It"],
                                             [0, 1, 0.5, 0.2, 0.9, 0.1, 0.6, 0.4]))]
    alone = [server.post(b)[1]["choices"][0]["text"] for b in bodies]
    before = json.loads(server.get("/stats")[1])
    results, start = [None] * len(bodies), threading.Barrier(len(bodies))

    def client(i):
        start.wait()
        results[i] = server.post(bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for (status, got), want, body in zip(results, alone, bodies):
        assert status == 200
        assert got["choices"][0]["text"] == want
        assert got["usage"]["completion_tokens"] <= body["max_tokens"]
    after = json.loads(server.get("/stats")[1])
    assert after["rows"] - before["rows"] == 8
    assert after["batches"] - before["batches"] < 8  # some decoded together


BAD = [  # (the body, or raw bytes; the field the error names, or None for the body as a whole; words in the message)
    (b"{\"prompt\": \"The film\",", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"prompt": "x", "alpha": "high"}, "alpha", "number"),
    ({"prompt": "x", "alpha": True}, "alpha", "number"),
    ({"prompt": "x", "alpha": 1.5}, "alpha", "extrapolate"),
    ({"prompt": "x", "weights": [1.0]}, "weights", "1 weights for 2 labels"),
    ({"prompt": "x", "weights": [1.0, 0.0, 0.0]}, "weights", "3 weights for 2 labels"),
    ({"prompt": "x", "weights": ["a", 1]}, "weights", "numbers"),
    ({"prompt": "x", "weights": {"happy": 1.0}}, "weights", "unknown label 'happy'"),
    ({"prompt": "x", "label": "happy"}, "label", "unknown label 'happy'"),
    ({"prompt": "x", "alpha": 0.5, "label": "positive"}, "label", "one of"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens", ">= 1"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "integer"),
    ({"prompt": "x", "max_tokens": 100_000}, "max_tokens", "past what the model can write"),
    ({"prompt": " the" * 1100}, "prompt", "window"),
    ({"prompt": 7}, "prompt", "string"),
    ({"prompt": "x", "temperature": -1}, "temperature", ">= 0"),
    ({"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "x", "n": 0}, "n", ">= 1"),
    ({"prompt": "x", "n": 17}, "n", "at most 16"),
    ({"prompt": "x", "stop": ["a", ""]}, "stop", "non-empty"),
    ({"prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": "x", "echo": True}, "echo", "not supported"),
    ({"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty", "in [-2, 2]"),
    ({"prompt": "x", "alpah": 0.5}, "alpah", "unknown field"),
    ({"prompt": "x", "guidance": -1}, "guidance", ">= 0"),
    ({"prompt": "x", "guidance": "strong"}, "guidance", "number"),
    ({"prompt": "x", "guidance": 1, "guide_from": "prefix"}, "guide_from", "one of"),
]


@pytest.mark.slow
def test_each_bad_request_gets_400_naming_the_field_and_the_server_stays_up(server):
    for body, field, words in BAD:
        status, got = server.post(None, raw=body) if isinstance(body, bytes) else server.post(body)
        assert status == 400, (body, got)
        assert got["error"]["param"] == field and words in got["error"]["message"], (body, got)
        if field:
            assert field in got["error"]["message"], got
    status, got = server.post({"prompt": "Still", "max_tokens": 3, "temperature": 0})
    assert status == 200 and got["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_models_names_the_checkpoint_its_labels_and_base(server, prefix_file, offline_model_dir):
    status, raw = server.get("/v1/models")
    card = json.loads(raw)["data"][0]
    assert status == 200 and card["object"] == "model" and card["id"] == prefix_file.name
    assert card["labels"] == LABELS and card["alpha"] is True and card["mode"] == "kv" and card["prefix_len"] == 4
    assert os.path.samefile(card["base_model"], offline_model_dir)


@pytest.mark.slow
def test_a_client_that_goes_away_frees_its_row(server):
    """A stream of 600 tokens, read for a few events and dropped: its batch stops long before 600 steps."""
    c = server.connection()
    c.request("POST", "/v1/completions", body=json.dumps({"prompt": "The film", "max_tokens": 600, "stream": True,
                                                          "temperature": 1.0, "seed": 0}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.readline().startswith(b"data: ")  # the first event
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        stats = json.loads(server.get("/stats")[1])
        if stats["decoding"] == 0 and stats["last_batch"] and stats["last_batch"]["max_tokens"] == 600:
            break
        time.sleep(0.2)
    assert stats["last_batch"]["rows_gone"] == 1 and stats["last_batch"]["steps"] < 600, stats
    status, got = server.post({"prompt": "Next", "max_tokens": 4, "temperature": 0})
    assert status == 200


@pytest.mark.slow
def test_serve_listens_on_loopback_and_refuses_sampling_flags(prefix_file):
    p = subprocess.run([sys.executable, str(REPO / "sample.py"), "--serve", "--prefix", str(prefix_file), "--alpha",
                        "0.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--alpha does not apply to --serve" in p.stderr and "'alpha'" in p.stderr
    p = subprocess.run([sys.executable, str(REPO / "sample.py"), "--port", "8000"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "--port is for --serve" in p.stderr


def test_serve_without_its_packages_says_what_to_install(prefix_file, tmp_path):
    """starlette hidden from the import system: sample.py --serve names the extra to install."""
    (tmp_path / "starlette").mkdir()
    (tmp_path / "starlette" / "__init__.py").write_text("raise ImportError('hidden', name='starlette')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    p = subprocess.run([sys.executable, str(REPO / "sample.py"), "--serve", "--prefix", str(prefix_file)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2 and "pip install -e \".[serve]\"" in p.stderr, p.stderr


# ---- the page, in headless Chromium ----

def chromium():
    """-> a Selenium driver for Debian's chromium (.ci/run installs chromium and chromium-driver)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,800"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))  # a fresh profile of its own each time


@pytest.mark.slow
def test_the_page_has_a_slider_per_mix_and_writes_when_one_moves(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    browser = chromium()
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(browser, 300)
        outs = wait.until(lambda b: (lambda o: o if len(o) == 3 else None)(b.find_elements(By.CSS_SELECTOR, ".out")))
        sliders = browser.find_elements(By.CSS_SELECTOR, "input.mix")
        assert [s.get_attribute("aria-label") for s in sliders] == ["alpha"] * 3  # two labels: the alpha slider
        assert [s.get_attribute("value") for s in sliders] == ["0", "0.5", "1"]
        wait.until(lambda b: all(o.get_attribute("data-state") == "done" for o in outs))
        text = lambda out: out.find_element(By.CSS_SELECTOR, ".text").get_property("textContent")
        first = [text(o) for o in outs]
        assert all(first) and len(set(first)) > 1  # text in every column, and the mixes write differently
        sliders[0].send_keys(Keys.RIGHT, Keys.RIGHT, Keys.RIGHT, Keys.RIGHT)  # alpha 0 -> 0.2
        wait.until(lambda b: json.loads(outs[0].get_attribute("data-request") or "{}").get("alpha") == 0.2
                   and outs[0].get_attribute("data-state") == "done")
        request = json.loads(outs[0].get_attribute("data-request"))
        status, want = server.post(dict(request, stream=False))  # the same request over plain HTTP
        assert status == 200 and text(outs[0]) and text(outs[0]) == want["choices"][0]["text"]
        assert browser.find_elements(By.CSS_SELECTOR, ".column h2")[0].text == "alpha 0.20"
    finally:
        browser.quit()
