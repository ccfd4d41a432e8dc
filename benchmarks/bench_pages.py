"""The web pages in headless Chromium against `dreaming serve` on a bundle (default: the default bundle):
page weight (bytes of HTML, scripts and styles each page loads) and the time to render a feature page, from
navigation to the page's `data-ready` (stats, charts, examples, dreams, similar features drawn), for features
the server has not rendered yet (uncached) and again (cached).

Starts its own server with a fresh job database. Features: live, non-dense ones spread over the layers.

    python benchmarks/bench_pages.py [--bundle DIR] [--features 4 | L/I,...] [--screenshots DIR]
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from bench_service import live_features, start_server

from dreaming.bundle import Bundle

CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# bytes of the page's HTML, scripts and styles, as the browser's resource timing saw them (API calls not counted)
WEIGHT = """() => [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]
  .filter(e => e.entryType === 'navigation' || ['script', 'link', 'css'].includes(e.initiatorType))
  .map(e => [e.entryType === 'navigation' ? 'document' : e.name.split('/').pop(), e.decodedBodySize])"""


def open_page(browser, url: str) -> tuple[float, dict[str, int], list[str]]:
    """Seconds from navigation to data-ready, bytes per file (HTML, scripts, styles), console errors."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    started = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=600_000)
    seconds = time.perf_counter() - started
    weights = dict(page.evaluate(WEIGHT))
    page.close()
    return seconds, weights, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle directory (default: the default bundle)")
    parser.add_argument("--features", default="4", help="feature ids L/I,... to time (the first also for the page "
                        "weight), or a count of live, non-dense features (default: 4)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--screenshots", help="save a full-page screenshot of each page here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    bundle = Bundle.open(args.bundle)
    features = args.features.split(",") if "/" in args.features else live_features(bundle, int(args.features))
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as playwright:
        server = start_server(str(bundle.directory), scratch, args.port)
        try:
            httpx.get(f"{url}/v1/health", timeout=60)
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            print(f"bundle {bundle.directory.name}; features {', '.join(features)}")
            print("\npage weight (bytes loaded: HTML + scripts + styles)")
            for path in ["/", f"/features/{features[0]}", "/batch"]:
                _, weights, errors = open_page(browser, url + path)
                print(f"  {path:<22} {sum(weights.values()):>9,}  {weights}" + (f"  errors: {errors}" if errors else ""))
            uncached, cached = [], []
            for feature in features[1:] or features:
                first, _, _ = open_page(browser, f"{url}/features/{feature}")
                again, _, _ = open_page(browser, f"{url}/features/{feature}")
                uncached.append(first)
                cached.append(again)
                print(f"  feature {feature:<10} uncached {first:6.2f} s   cached {again:6.2f} s")
            print(f"\nfeature page render, median over {len(uncached)}: uncached {statistics.median(uncached):.2f} s, "
                  f"cached {statistics.median(cached):.2f} s")
            if args.screenshots:
                out = Path(args.screenshots)
                out.mkdir(parents=True, exist_ok=True)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                for name, path in [("home", "/"), ("feature", f"/features/{features[0]}"), ("batch", "/batch")]:
                    page.goto(url + path)
                    page.wait_for_selector("body[data-ready=true]", timeout=600_000)
                    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                print(f"screenshots in {out}")
            browser.close()
        finally:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
