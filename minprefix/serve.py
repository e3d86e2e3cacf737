"""The dial as a service: an OpenAI-style completions server with the project's own fields, and a page.

  POST /v1/completions   OpenAI's completions request (prompt, max_tokens, temperature, top_p, n, seed, stream,
                         stop) plus the mix: alpha (alpha * positive + (1 - alpha) * the other label), or weights
                         (one per label: a list in the checkpoint's order, or {label: weight}), or label (one alone)
  GET  /v1/models        the checkpoint: its labels (in the checkpoint's order), base model and method
  GET  /                 a page (minprefix/page.html): a prompt, a slider per label, the text streaming in
  GET  /stats            what the worker has done: batches, rows, steps, rows freed by clients that went away

Requests that arrive together are decoded together: one worker thread owns the model and takes what is queued
(up to --batch-size rows) as one batch, left-padded (generate.pad_left), each row with its own mix (method.apply
with one row of weights per row: per-row prefixes, or per-row LoRA mixes) and its own sampling settings and
generator, so a seeded request writes the same text whatever else shares its batch. A request that arrives while a
batch decodes waits for the next one. A client that goes away mid-text frees its row: the row is no longer
sampled or sent, and a batch whose rows are all gone or done stops.

Starlette (routing, requests, streamed responses that learn when the client has gone) under uvicorn (the HTTP
server): small, well kept, and what FastAPI is built on; server-sent events are a streamed response.
"""
import asyncio
import json
import math
import os
import secrets
import sys
import threading
import time
from collections import deque
from importlib import resources

import torch

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # the optional extra
    raise ImportError(f"the server needs {e.name}, which is not installed: pip install -e \".[serve]\"") from e

from minprefix import fast
from minprefix.data import source_prompt
from minprefix.generate import REPEAT_WINDOW, pad_left, penalize, probabilities, start
from minprefix.guidance import ANCHORS, DEFAULT_ANCHOR, DEFAULT_STRENGTH, guide
from minprefix.prefix import mix_weights
from minprefix.tokenizer import Tokenizer

# Once a request is in, the worker waits for the others sent with it (the page's columns, clients whose texts
# ended together) while they keep coming: until none has come for GATHER seconds, GATHER_MAX at most.
GATHER, GATHER_MAX = 0.015, 0.06
MAX_STOPS = 4  # as OpenAI's


class BadRequest(ValueError):
    """A request refused with 400: param is the field at fault (None: the body as a whole)."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param, self.message = param, message


# ---- the request ----

# The numeric fields: name -> (default, type, test, what the value must be). A new one (the guidance strength) is
# one more line here; its value reaches the worker in Row.settings.
NUMBERS = {
    "max_tokens": (16, int, lambda v: v >= 1, "an integer >= 1"),  # OpenAI's default; the ceiling: Engine.room
    "temperature": (1.0, float, lambda v: v >= 0, "a number >= 0 (0: greedy)"),
    "top_p": (1.0, float, lambda v: 0 < v <= 1, "a number in (0, 1] (1: off)"),
    "top_k": (None, int, lambda v: v >= 1, "an integer >= 1, or null for off"),  # vLLM's extension
    "n": (1, int, lambda v: v >= 1, "an integer >= 1"),
    "seed": (None, int, lambda v: v >= 0, "an integer >= 0"),
    "alpha": (None, float, lambda v: True, "a number"),  # its range is checked with the labels
    "guidance": (None, float, lambda v: v >= 0, "a number >= 0 (0: the K/V mix alone)"),  # minprefix/guidance.py
    "frequency_penalty": (0.0, float, lambda v: -2 <= v <= 2, "a number in [-2, 2] (OpenAI's range; 0: off)"),
}
# OpenAI fields the server does not implement: accepted only at the value that means "off"
OFF = {"echo": (False,), "logprobs": (None, 0), "best_of": (None, 1), "suffix": (None, ""),
       "presence_penalty": (None, 0), "logit_bias": (None, {})}
OTHERS = {"prompt", "stream", "stream_options", "stop", "weights", "label", "extrapolate", "model", "user",
          "guide_from"}


def number(body, name):
    default, kind, test, says = NUMBERS[name]
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind is int:
        ok = ok and float(v).is_integer()
    if not ok or not test(kind(v)):
        raise BadRequest(name, f"{name} must be {says}, got {json.dumps(v)}")
    return kind(v)


def guiding(row):  # -> (strength, anchor): the guidance a row asks for; a batch's rows all ask for the same
    return row.settings["guidance"], row.settings["guide_from"]


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---- the rows a batch decodes ----

class Job:
    """One request: its rows (prompts x n), and the way back to the handler that waits for them."""

    def __init__(self, rows, stream, loop):
        self.rows, self.stream, self.loop = rows, stream, loop
        self.reported = False  # "done" sent
        self.events = asyncio.Queue()  # read by the handler, in the event loop; written by the worker through send
        self.cancelled = threading.Event()  # the client went away
        for r in rows:
            r.job = self

    def send(self, event):  # from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is stopping
            self.cancelled.set()


class Row:
    """One text being written: its prompt's tokens, mix (1, n_labels), sampling settings and generator, and what
    it has written so far."""

    def __init__(self, index, ids, weights, settings, generator, stops):
        self.index, self.ids, self.weights, self.settings = index, ids, weights, settings
        self.generator, self.stops = generator, stops
        self.max_tokens = settings["max_tokens"]
        self.sampling = (settings["temperature"], settings["top_k"], settings["top_p"])
        self.tokens, self.text, self.sent, self.finish = [], "", 0, None
        self.closed = False  # its finish sent (streaming)
        self.job = None

    @property
    def live(self):
        return self.finish is None and not self.job.cancelled.is_set()

    def add(self, token, tok, piece):
        """Take one new token: end at <|endoftext|>, at a stop string (cut before it) or at max_tokens."""
        if token == tok.eot:
            self.end("stop", tok)
            return
        self.tokens.append(token)
        before = len(self.text)
        self.text += piece(token)
        for s in self.stops:
            at = self.text.find(s, max(0, before - len(s) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self.finish = "stop"
                return
        if len(self.tokens) == self.max_tokens:
            self.end("length", tok)

    def end(self, reason, tok):
        self.finish = reason
        self.text = tok.decode(self.tokens)  # whole: a last character left unfinished decodes as sample.py's does

    def news(self):
        """-> the text not sent yet that can be: all of it once the row is done, else all but the end that could
        still become a stop string (which is never sent)."""
        ready = len(self.text)
        if self.finish is None:
            for s in self.stops:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        ready = min(ready, len(self.text) - k)
                        break
        new, self.sent = self.text[self.sent:ready], max(self.sent, ready)
        return new


def pick(logits, rows, eot, probabilities=probabilities):
    """logits (B, V) -> tokens (B, 1): each live row by its own settings and generator (its frequency_penalty
    over its own last tokens, generate.penalize), rows sharing settings through one probabilities() call
    (generate's, or fast's); rows done or gone take <|endoftext|>."""
    tokens = [eot] * len(rows)
    groups = {}
    logits = logits.float()
    for i, r in enumerate(rows):
        if r.live:
            groups.setdefault(r.sampling, []).append(i)
    penalized = [i for i in range(len(rows)) if rows[i].live and rows[i].settings["frequency_penalty"]]
    if penalized:
        logits = logits.clone()  # the caller's stay as they were
        for i in penalized:
            recent = torch.tensor([rows[i].tokens[-REPEAT_WINDOW:]], dtype=torch.long, device=logits.device)
            logits[i:i + 1] = penalize(logits[i:i + 1], recent, rows[i].settings["frequency_penalty"])
    for (temperature, top_k, top_p), members in groups.items():
        chosen = logits[members]  # (b, V)
        if temperature == 0:
            got = chosen.argmax(dim=-1).tolist()
        else:
            probs = probabilities(chosen, temperature, top_k, top_p)
            got = [torch.multinomial(probs[j:j + 1], 1, generator=rows[i].generator).item()
                   for j, i in enumerate(members)]
        for i, t in zip(members, got):
            tokens[i] = t
    return torch.tensor(tokens, device=logits.device).view(-1, 1)


# ---- the engine: the model, and the one thread that runs it ----

class Engine:
    def __init__(self, model, method, meta, checkpoint, batch_size=16):
        self.model, self.method, self.meta, self.checkpoint = model, method, meta, checkpoint
        self.labels = list(meta["labels"]) if method.mixes else []
        self.conditional = bool(meta["info"].get("conditional"))
        self.batch_size = batch_size
        self.start_decoding = fast.start if fast.enabled() else start  # sample.py --reference: generate's
        self.probabilities = fast.probabilities if fast.enabled() else probabilities
        self.tok = Tokenizer.for_model(model.name_or_path)
        with torch.no_grad():
            _, cache = method.apply(model, torch.ones(1, max(1, len(self.labels)), device=model.device))
        self.prefix_len = 0 if cache is None else cache.length  # positions before the text, taken from the window
        self.name = os.path.basename(os.path.normpath(str(checkpoint)))
        self.created = int(time.time())
        self.queue, self.ready = deque(), threading.Condition()
        self.closing = False
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "steps": 0, "rows_gone": 0, "decoding": 0,
                      "last_batch": None}  # GET /stats
        self.worker = threading.Thread(target=self.work, name="minprefix-decoder", daemon=True)
        self.worker.start()

    def room(self, prompt_len):
        """The most tokens a prompt of prompt_len tokens can be given: the window (n_positions) less the prefix
        and the prompt, plus the last token, sampled but never fed back (generate.room). The one place the
        server's ceiling on max_tokens is computed."""
        return self.model.config.n_positions - self.prefix_len - prompt_len + 1

    # -- requests --

    def rows(self, body):
        """A parsed request body (a dict) -> (rows, stream, include_usage); BadRequest naming the field."""
        unknown = [k for k in body if k not in NUMBERS and k not in OFF and k not in OTHERS]
        if unknown:
            raise BadRequest(unknown[0], f"unknown field {unknown[0]!r}: this server reads "
                                         f"{', '.join(sorted(set(NUMBERS) | OTHERS))}")
        for name, off in OFF.items():
            if name in body and body[name] not in off:
                raise BadRequest(name, f"{name} is not supported here: leave it out (or {json.dumps(off[0])})")
        settings = {name: number(body, name) for name in NUMBERS}
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream", f"stream must be true or false, got {json.dumps(stream)}")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
            raise BadRequest("stream_options", "stream_options must be {\"include_usage\": true or false}")
        prompts = self.prompts(body.get("prompt", ""))
        stops = body.get("stop")
        stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
        if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
            raise BadRequest("stop", f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings")
        weights = self.weights(body, settings["alpha"])
        mixes = self.method.mixes and len(self.labels) > 1
        if settings["guidance"] is None:
            settings["guidance"] = DEFAULT_STRENGTH if mixes else 0.0
        elif settings["guidance"] and not mixes:
            raise BadRequest("guidance", "guidance combines the labels' logits: this checkpoint has "
                                         + ("one label" if self.labels else "no labels to mix"))
        settings["guide_from"] = body.get("guide_from", DEFAULT_ANCHOR)
        if settings["guide_from"] not in ANCHORS:
            raise BadRequest("guide_from", f"guide_from must be one of {', '.join(map(json.dumps, ANCHORS))}, "
                                           f"got {json.dumps(settings['guide_from'])}")
        n = settings["n"]
        if len(prompts) * n > self.batch_size:
            raise BadRequest("n", f"{len(prompts)} prompt(s) x n={n} rows: at most {self.batch_size} (the server's "
                                  f"--batch-size) in one request")
        given = body.get("max_tokens") is not None
        rows = []
        for i, q in enumerate(prompts):
            ids = source_prompt(self.tok, q) if self.conditional else [self.tok.eot] + self.tok.encode(q)
            room = self.room(len(ids))
            if room < 1:
                raise BadRequest("prompt", f"the prompt is {len(ids)} tokens; with the prefix's {self.prefix_len} "
                                           f"positions the window of {self.model.config.n_positions} holds at most "
                                           f"{self.model.config.n_positions - self.prefix_len}")
            if settings["max_tokens"] > room:
                if given:
                    raise BadRequest("max_tokens", f"max_tokens {settings['max_tokens']} is past what the model can "
                                                   f"write after this prompt: at most {room} (its window of "
                                                   f"{self.model.config.n_positions} positions, less the prefix's "
                                                   f"{self.prefix_len} and the prompt's {len(ids)}, plus one)")
            row_settings = dict(settings, max_tokens=min(settings["max_tokens"], room))
            for j in range(n):
                k = i * n + j  # OpenAI's order of choices
                g = torch.Generator(device=self.model.device)
                g.manual_seed(secrets.randbits(63) if settings["seed"] is None else settings["seed"] + k)
                rows.append(Row(k, ids, weights, row_settings, g, stops))
        return rows, stream, bool(options.get("include_usage", False))

    def prompts(self, prompt):
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(q, str) for q in prompt):
            raise BadRequest("prompt", "prompt must be a string or a non-empty list of strings")
        if self.conditional and not all(q.strip() for q in prompt):
            raise BadRequest("prompt", "this checkpoint writes text for a source (e.g. an E2E table): the prompt is "
                                       "the source, and cannot be empty")
        return prompt

    def weights(self, body, alpha):  # -> (1, n_labels)
        given = [f for f in ("alpha", "weights", "label") if body.get(f) is not None]
        if len(given) > 1:
            raise BadRequest(given[1], f"give one of alpha, weights, label; got {' and '.join(given)}")
        if not self.method.mixes:
            if given:
                raise BadRequest(given[0], f"{self.name} is a fine-tuned model, one model for every label: it has "
                                           f"no labels to mix")
            return torch.ones(1, 1)
        field = given[0] if given else None
        try:
            if field == "alpha":
                if not 0 <= alpha <= 1 and body.get("extrapolate") is not True:
                    raise ValueError(f"alpha must be in [0, 1] (1: positive, 0: the other label), got {alpha}; add "
                                     f"\"extrapolate\": true to go beyond")
                return mix_weights(self.labels, alpha=alpha)
            if field == "label":
                if not isinstance(body["label"], str):
                    raise ValueError("label must be a string: one of the checkpoint's labels")
                return mix_weights(self.labels, label=body["label"])
            if field == "weights":
                w = body["weights"]
                values = list(w.values()) if isinstance(w, dict) else w if isinstance(w, list) else None
                if values is None or not all(is_number(v) for v in values):
                    raise ValueError(f"weights must be a list of numbers, one per label ({', '.join(self.labels)}), "
                                     f"or an object {{label: number}}")
                return mix_weights(self.labels, weights=w)
        except ValueError as e:
            raise BadRequest(field, f"{field}: {e}") from None
        if len(self.labels) == 1:
            return mix_weights(self.labels, label=self.labels[0])
        if len(self.labels) == 2:
            return torch.full((1, 2), 0.5)
        raise BadRequest("weights", f"this checkpoint has {len(self.labels)} labels ({', '.join(self.labels)}): "
                                    f"give weights (one per label) or a label")

    def submit(self, rows, stream, loop):
        job = Job(rows, stream, loop)
        with self.ready:
            self.queue.append(job)
            self.ready.notify()
        return job

    def close(self):
        with self.ready:
            self.closing = True
            self.ready.notify()

    # -- the worker --

    def work(self):
        while True:
            jobs = self.next_batch()
            if jobs is None:
                return
            try:
                with torch.no_grad():
                    self.decode(jobs)
            except Exception as e:  # the server stays up; these requests get a 500 naming the error
                print(f"# decoding failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                for job in jobs:
                    job.send(("error", f"{type(e).__name__}: {e}"))

    def next_batch(self):
        """-> the queued jobs that fit one batch, oldest first (None when closing). A job fits while the rows stay
        within --batch-size and the longest prompt leaves room for the longest text (left padding gives every
        row the longest prompt's length)."""
        with self.ready:
            while not self.queue and not self.closing:
                self.ready.wait()
            if self.closing:
                return None
            deadline = time.monotonic() + GATHER_MAX
            while sum(len(j.rows) for j in self.queue) < self.batch_size:
                left = min(GATHER, deadline - time.monotonic())
                if left <= 0 or not self.ready.wait(left):  # quiet for GATHER, or GATHER_MAX reached
                    break
            jobs, rows = [], []
            while self.queue:
                job = self.queue[0]
                if job.cancelled.is_set():
                    self.queue.popleft()
                    continue
                both = rows + job.rows
                if jobs and (len(both) > self.batch_size or guiding(job.rows[0]) != guiding(rows[0]) or
                             self.room(max(len(r.ids) for r in both)) < max(r.max_tokens for r in both)):
                    break
                jobs.append(self.queue.popleft())
                rows = both
            return jobs

    def decode(self, jobs):
        rows = [r for job in jobs for r in job.rows]
        if not rows:
            return
        device = self.model.device
        idx, real = pad_left([r.ids for r in rows], self.tok.eot, device=device)  # (B, T)
        weights = torch.cat([r.weights for r in rows]).to(device)  # (B, n_labels): each row its own mix
        run, cache = guide(self.method, self.model, weights, *guiding(rows[0]), self.tok.eot)  # a batch: one guidance
        n, logits, step = self.start_decoding(run, idx, max(r.max_tokens for r in rows), kv_cache=cache, real=real)
        pieces = [self.tok.stream_decoder() for _ in rows]
        stats = self.stats
        stats.update(batches=stats["batches"] + 1, rows=stats["rows"] + len(rows), decoding=len(rows),
                     largest_batch=max(stats["largest_batch"], len(rows)))
        steps = 0
        try:
            for steps in range(1, n + 1):
                x = pick(logits, rows, self.tok.eot, self.probabilities)  # (B, 1)
                for r, t, piece in zip(rows, x[:, 0].tolist(), pieces):
                    if r.live:
                        r.add(t, self.tok, piece)
                for job in jobs:
                    self.report(job)
                stats["decoding"] = sum(r.live for r in rows)
                if not stats["decoding"] or steps == n:
                    break
                logits = step(x)
            for r in rows:  # rows the window ended (none: room() was checked for each)
                if r.live:
                    r.end("length", self.tok)
            for job in jobs:
                self.report(job)
        finally:
            gone = sum(r.job.cancelled.is_set() and not r.job.reported for r in rows)
            stats.update(steps=stats["steps"] + steps, rows_gone=stats["rows_gone"] + gone, decoding=0,
                         last_batch={"rows": len(rows), "steps": steps, "max_tokens": n, "rows_gone": gone})

    def report(self, job):
        """Send a job what is new: each streamed row's new text (and its finish once it ends), and once every row
        has ended, "done"."""
        if job.cancelled.is_set() or job.reported:
            return
        if job.stream:
            out = []
            for r in job.rows:
                if r.closed:
                    continue
                new = r.news()
                if new or r.finish is not None:
                    out.append((r.index, new, r.finish))
                    r.closed = r.finish is not None
            if out:
                job.send(("pieces", out))
        if all(r.finish is not None for r in job.rows):
            job.reported = True
            job.send(("done", None))

    # -- what the server says of itself --

    def usage(self, rows):
        prompt = sum({id(r.ids): len(r.ids) for r in rows}.values())  # each prompt once (its n rows share ids)
        written = sum(len(r.tokens) for r in rows)
        return {"prompt_tokens": prompt, "completion_tokens": written, "total_tokens": prompt + written}

    def card(self):
        m, c = self.meta, self.model.config
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "minprefix",
                "checkpoint": os.path.abspath(str(self.checkpoint)), "base_model": self.model.name_or_path,
                "mode": m["mode"], "labels": self.labels, "mixes": bool(self.method.mixes),
                "alpha": self.method.mixes and len(self.labels) == 2 and "positive" in self.labels,
                "guidance": DEFAULT_STRENGTH if self.method.mixes and len(self.labels) > 1 else None,
                "conditional": self.conditional, "n_positions": c.n_positions, "prefix_len": self.prefix_len,
                "batch_size": self.batch_size}


# ---- HTTP ----

def error(status, message, param=None):
    kind = "invalid_request_error" if status == 400 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def app(engine):
    """The Starlette application over an Engine."""

    async def completions(request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"the request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object, e.g. {\"prompt\": \"The film\", \"alpha\": 1}")
        try:
            rows, stream, include_usage = engine.rows(body)
        except BadRequest as e:
            return error(400, e.message, e.param)
        job = engine.submit(rows, stream, asyncio.get_running_loop())
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": engine.name}
        if stream:
            return StreamingResponse(events(job, head, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()  # frees its rows
                        return error(499, "the client went away")
                    continue
                if kind == "error":
                    return error(500, f"decoding failed: {payload}")
                if kind == "done":
                    break
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        choices = [{"text": r.text, "index": r.index, "logprobs": None, "finish_reason": r.finish} for r in rows]
        return JSONResponse({**head, "choices": choices, "usage": engine.usage(rows),
                             "weights": dict(zip(engine.labels, rows[0].weights[0].tolist()))})

    async def events(job, head, include_usage):
        def data(obj):
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "pieces":
                    for index, text, finish in payload:
                        yield data({**head, "choices": [{"text": text, "index": index, "logprobs": None,
                                                         "finish_reason": finish}]})
                elif kind == "error":
                    yield data({"error": {"message": f"decoding failed: {payload}", "type": "server_error",
                                          "param": None, "code": None}})
                    return
                else:
                    if include_usage:
                        yield data({**head, "choices": [], "usage": engine.usage(job.rows)})
                    yield "data: [DONE]\n\n"
                    return
        finally:  # finished, or the client went away (Starlette cancels the stream): either way the rows are free
            job.cancelled.set()

    async def models(request):
        return JSONResponse({"object": "list", "data": [engine.card()]})

    async def stats(request):
        with engine.ready:
            queued = sum(len(j.rows) for j in engine.queue)
        return JSONResponse(dict(engine.stats, queued=queued))

    async def page(request):
        return HTMLResponse(resources.files("minprefix").joinpath("page.html").read_text(encoding="utf-8"))

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/stats", stats, methods=["GET"]),
                             Route("/", page, methods=["GET"])])


def serve(engine, host="127.0.0.1", port=8000):
    """Answer on host:port until interrupted (Ctrl-C)."""
    print(f"# serving {engine.checkpoint} ({', '.join(engine.labels) or 'no labels'}) at http://{host}:{port}/ "
          f"(the page) and http://{host}:{port}/v1/completions; Ctrl-C stops", flush=True)
    try:
        uvicorn.run(app(engine), host=host, port=port, log_level="warning")
    finally:
        engine.close()
