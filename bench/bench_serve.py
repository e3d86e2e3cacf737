"""sample.py --serve under load: tokens per second for 1 client against 8 concurrent clients (the server decodes
requests that arrive together as one batch), and the latency of the first token.

Each round runs both sides in turn on the same warm server: 1 client sending --requests streamed requests one
after another, then 8 clients (threads) each doing the same at once. Every request samples (temperature 0.8,
top_p 0.9, its own seed and alpha; --temperature 0: greedy) up to --max-tokens tokens; tokens per second is the tokens written (the
servers' usage counts, <|endoftext|> ends a text early) over the side's wall time; the first token's latency is
from sending a request to reading its first event. Figures: medians over rounds with [min-max]; the mean rows
per batch from the server's GET /stats.

  nice -n 10 python bench/bench_serve.py --model ../shared/models/imdb-gpt2-19m

Without --prefix, a K/V prefix (P=10) started from tone words' keys and values (no training: speed does not
depend on it) is built and saved in a temporary folder. The offline stand-in imdb-gpt2-19m is NOT GPT-2.
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PROMPTS = ["The film", "I went to see", "This is", "", "The plot", "My favourite", "It was", "After the"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def tone_prefix(model_dir, folder, prefix_len=10):
    """A K/V prefix whose two labels start from words of their tone, saved with the package's own save."""
    import torch
    from minprefix import GPT2, Tokenizer
    from minprefix.method import build
    model = GPT2.from_pretrained(model_dir)
    tok = Tokenizer.for_model(model.name_or_path)
    method = build("kv", model, ["positive", "negative"], tok, prefix_len=prefix_len)
    words = [(tok.encode(w) * prefix_len)[:prefix_len] for w in (" wonderful, great, superb", " awful, boring, worst")]
    method.init_from_tokens(model, torch.tensor(words))
    path = os.path.join(folder, "tone-prefix.safetensors")
    method.save(path, model, ["positive", "negative"])
    return path


def start_server(prefix, model, folder, *flags):
    """sample.py --serve on a free port, up and answering -> (process, port). Its output goes to folder/server.log."""
    port = free_port()
    log = open(os.path.join(folder, "server.log"), "w+")
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "sample.py"), "--serve", "--port", str(port),
                               "--prefix", prefix, "--model", model, *flags], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            stats(port)
            return server, port
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                log.seek(0)
                sys.exit(f"the server did not come up:\n{log.read()}")
            time.sleep(0.5)


def stream(port, body):
    """One streamed request -> (seconds to its first event, tokens written)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=json.dumps(dict(body, stream=True,
                                                              stream_options={"include_usage": True})),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"the server answered {r.status}: {r.read()[:500]}")
    first, usage = None, None
    for line in r:
        if not line.startswith(b"data: "):
            continue
        if first is None:
            first = time.perf_counter() - t0
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "usage" in chunk:
            usage = chunk["usage"]
    c.close()
    return first, usage["completion_tokens"]


def side(port, clients, requests, max_tokens, round_, temperature=0.8):
    """clients threads, each sending `requests` requests in turn -> (tokens/s, [first-token seconds])."""
    firsts, tokens, lock = [], [0], threading.Lock()

    def client(k):
        for i in range(requests):
            body = {"prompt": PROMPTS[k % len(PROMPTS)], "alpha": (k % 5) / 4, "max_tokens": max_tokens,
                    "temperature": temperature, "top_p": 0.9, "seed": 1000 * round_ + 10 * k + i}
            first, n = stream(port, body)
            with lock:
                firsts.append(first)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.perf_counter() - t0), firsts


def stats(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", "/stats")
    out = json.loads(c.getresponse().read())
    c.close()
    return out


def spread(values, fmt="{:.1f}"):
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MINPREFIX_MODEL", "gpt2"),
                   help="the base model (default: $MINPREFIX_MODEL, else gpt2)")
    p.add_argument("--prefix", help="a checkpoint to serve (default: a tone-word prefix built for the bench)")
    p.add_argument("--rounds", type=int, default=3, help="(default: %(default)s)")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends per round (default: "
                   "%(default)s)")
    p.add_argument("--clients", type=int, default=8, help="the concurrent side's clients (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=48, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default: %(default)s, with top_p 0.9)")
    p.add_argument("--reference", action="store_true", help="serve with sample.py --reference")
    args = p.parse_args()

    import torch
    from minprefix.fast import cpu_has, cpu_name
    folder = tempfile.mkdtemp(prefix="bench-serve-")
    prefix = args.prefix or tone_prefix(args.model, folder)
    server, port = start_server(prefix, args.model, folder, *(["--reference"] if args.reference else []))
    try:
        side(port, 1, 1, 8, 0)  # warm-up: the first batch packs the weights
        side(port, args.clients, 1, 8, 0)
        one, many, ratio, first_one, first_many, rows = [], [], [], [], [], []
        for r in range(1, args.rounds + 1):
            a, fa = side(port, 1, args.requests, args.max_tokens, r, args.temperature)
            before = stats(port)
            b, fb = side(port, args.clients, args.requests, args.max_tokens, r, args.temperature)
            after = stats(port)
            one.append(a)
            many.append(b)
            ratio.append(b / a)
            first_one.append(statistics.median(fa) * 1000)
            first_many.append(statistics.median(fb) * 1000)
            rows.append((after["rows"] - before["rows"]) / (after["batches"] - before["batches"]))
            print(f"# round {r}: 1 client {a:.1f} tok/s, {args.clients} clients {b:.1f} tok/s ({b / a:.2f}x); first "
                  f"token {first_one[-1]:.0f} / {first_many[-1]:.0f} ms; {rows[-1]:.1f} rows per batch", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    amx = cpu_has("amx_bf16", "amx_int8", "amx_tile")
    print(f"\nsample.py --serve{' --reference' if args.reference else ''} on {cpu_name()} (AMX: "
          f"{'yes' if amx else 'no'}), {os.cpu_count()} cores, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} at the end; model {args.model}"
          + (" (the offline stand-in, NOT GPT-2)" if "imdb-gpt2-19m" in args.model else "") +
          f"; {args.rounds} rounds x {args.requests} requests per client, up to {args.max_tokens} tokens each, "
          + (f"sampled (temperature {args.temperature}, top_p 0.9)" if args.temperature else "greedy")
          + "; medians over rounds [min-max]\n")
    print(f"| clients | tokens/s | vs 1 client | first token, ms (each round's median) | rows per batch |")
    print("|---|---|---|---|---|")
    print(f"| 1 | {spread(one)} | 1x | {spread(first_one, '{:.0f}')} | 1 |")
    print(f"| {args.clients} | {spread(many)} | {spread(ratio, '{:.2f}')}x | {spread(first_many, '{:.0f}')} | "
          f"{spread(rows)} |")


if __name__ == "__main__":
    main()
