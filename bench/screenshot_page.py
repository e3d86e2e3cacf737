"""The page of sample.py --serve, as a browser shows it once its columns have written: docs/figures/page.png.

Starts the server on a free port, opens its page in Debian's headless chromium (through chromedriver, Selenium),
waits until every column has written its text, and saves a screenshot.

  python bench/screenshot_page.py --model ../shared/models/imdb-gpt2-19m [--prefix weights/prefix.safetensors]

Without --prefix, the K/V prefix bench/bench_serve.py builds (its labels started from tone words, untrained).
"""
import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_serve import start_server, tone_prefix  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MINPREFIX_MODEL", "gpt2"),
                   help="the base model (default: $MINPREFIX_MODEL, else gpt2)")
    p.add_argument("--prefix", help="a checkpoint to serve (default: an untrained tone-word prefix, as the bench's)")
    p.add_argument("--prompt", default="The movie", help="(default: %(default)s)")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "figures", "page.png"), help="(default: %(default)s)")
    p.add_argument("--size", default="1400,600", help="the window, width,height (default: %(default)s)")
    args = p.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    folder = tempfile.mkdtemp(prefix="page-")
    prefix = args.prefix or tone_prefix(args.model, folder)
    server, port = start_server(prefix, args.model, folder)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={args.size}", f"--user-data-dir={os.path.join(folder, 'profile')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 600)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".out")) > 0)
        box = browser.find_element(By.ID, "prompt")
        if box.get_property("value") != args.prompt:
            box.clear()
            box.send_keys(args.prompt)
            browser.find_element(By.ID, "write").click()
        wait.until(lambda b: all(o.get_attribute("data-state") == "done"
                                 for o in b.find_elements(By.CSS_SELECTOR, ".out")))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        browser.save_screenshot(args.out)
        for o in browser.find_elements(By.CSS_SELECTOR, ".column"):
            print(o.text.replace("\n", " | "))
        print(f"wrote {args.out}")
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
