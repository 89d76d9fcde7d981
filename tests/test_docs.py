"""The docs site and the README: the sources fit the build, README.md is what index.ipynb makes, and the
site built from the executed notebooks works in headless Chromium (pages, links, figures, no tracebacks)."""
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urldefrag, urlsplit
from urllib.request import urlopen

import pytest

from conftest import NBS, ROOT
from lgl2o import docs

CHROMIUM = Path(os.environ.get('LGL2O_CHROMIUM', '/usr/bin/chromium'))
CHROMEDRIVER = Path(os.environ.get('LGL2O_CHROMEDRIVER', '/usr/bin/chromedriver'))
ARTIFACTS = Path(os.environ.get('LGL2O_ARTIFACTS', ROOT / 'artifacts'))
# What the browser may do here: no sandbox as root, no GPU, no traffic beyond this machine
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--disable-dev-shm-usage', '--window-size=1280,900',
                  '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1']
DOCS_CLI = [sys.executable, '-c', 'import sys; from lgl2o.docs import main; sys.exit(main())']


@pytest.fixture(scope='module')
def project():
    return docs.find_project(ROOT)


# --- the sources, without building anything ----------------------------------------------------

def test_readme_is_generated(project):
    "README.md (and its figures) is exactly what `lgl2o-docs readme` makes of nbs/index.ipynb"
    text, files = docs.readme_markdown(project)
    fix = "README.md is generated: edit nbs/index.ipynb, run `make readme` (lgl2o-docs readme) and commit README.md"
    assert (ROOT / 'README.md').read_text() == text, fix
    for name, data in files.items():
        assert (ROOT / name).exists() and (ROOT / name).read_bytes() == data, fix


def test_readme_images_exist():
    "Every image README.md shows is a committed file beside it (the home page's figure among them)"
    text = (ROOT / 'README.md').read_text()
    images = re.findall(r'!\[[^\]]*\]\(([^)\s]+)\)', text)
    assert images, "README.md shows no figure: the home page (nbs/index.ipynb) must keep its executed figure"
    for src in images:
        assert not re.match(r'^[a-z]+:', src), f"README.md loads {src} from elsewhere; keep its figures in README_files/"
        assert (ROOT / src).is_file(), f"README.md shows {src}, which does not exist: run `make readme` and commit README_files/"


def _output(text, cls='', mime='text/plain'):
    return f'<div class="jp-RenderedText jp-OutputArea-output {cls}" data-mime-type="{mime}">\n<pre>{text}</pre>\n</div>'


def test_page_check_finds_leaks(tmp_path):
    "The built-page check names the page and line of stderr output, warnings, tracebacks and local paths in cell outputs"
    ok = _output('loss 0.12 after 100 steps') + '\n<p>python -m venv .venv; a UserWarning: says /tmp/x</p>'   # prose may name them
    assert docs.page_problems(ok) == []
    cases = {_output('anything', 'output_stderr'): 'stderr',
             _output('anything', mime='application/vnd.jupyter.stderr'): 'stderr',
             '<div class="cell-output cell-output-stderr"><pre>anything</pre></div>': 'stderr',
             _output('x.py:3: DeprecationWarning: old'): 'a warning',
             _output('TqdmWarning: IProgress not found'): 'a warning',
             _output('Traceback (most recent call last):'): 'a traceback',
             '<div class="cell-output cell-output-stdout"><pre><code>saved to /home/someone/run</code></pre></div>': 'local path',
             _output('lib/python3.11/site-packages/torch/nn.py'): 'local path',
             _output('see /root/.cache'): 'local path'}
    for page, what in cases.items():
        found = docs.page_problems('<p>fine</p>\n' + page, 'p.html')
        assert len(found) == 1 and found[0].startswith('p.html:') and what in found[0], (page, found)
    (tmp_path / 'a.html').write_text(ok)
    docs.check_pages(tmp_path)
    (tmp_path / 'b.html').write_text('<p>fine</p>\n' + _output('/tmp/x/y.py:1: UserWarning: y'))
    with pytest.raises(docs.DocsError, match=r'b\.html:3: a warning'): docs.check_pages(tmp_path)


def test_sources_fit_the_docs_build(project):
    "The sidebar resolves, params files match their notebooks, and no cell mixes imports with other code"
    docs.check_sources(project)


def test_every_notebook_is_in_the_sidebar(project):
    "A page nobody can reach is a missing page: every notebook appears in _quarto.yml's sidebar"
    listed = set(docs.sidebar_notebooks(docs.load_sidebar(project)))
    missing = [p.relative_to(project.nbs).as_posix() for p in docs.source_notebooks(project.nbs)]
    missing = [m for m in missing if m not in listed]
    assert not missing, f"add {missing} to website.sidebar.contents in _quarto.yml"


def _cli(*args, cwd=ROOT):
    return subprocess.run(DOCS_CLI + list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_bad_option_is_one_line():
    res = _cli('site', '--colour', 'blue')
    assert res.returncode == 2
    assert res.stderr.strip().count('\n') == 0 and 'unrecognized arguments: --colour blue' in res.stderr


@pytest.mark.parametrize('args, message', [
    (['site', '--out', '.'], 'would replace the sources'),
    (['site', '--out', 'nbs/site'], 'is inside the sources'),
    (['site', '--executed', 'no/such/folder'], 'is not a folder'),
])
def test_cli_refuses_bad_folders(args, message):
    "Nothing runs, nothing is deleted: exit 1 with the problem"
    res = _cli(*args)
    assert res.returncode == 1 and message in res.stderr, res.stderr[-2000:]


def test_cli_outside_the_repository(tmp_path):
    res = _cli('readme', cwd=tmp_path)
    assert res.returncode == 1 and 'no settings.ini' in res.stderr


def test_missing_sidebar_notebook_stops_the_build(tmp_path):
    "A notebook listed in _quarto.yml that does not exist is an error naming it, before anything runs"
    root = tmp_path / 'proj'
    shutil.copytree(ROOT / 'nbs', root / 'nbs', ignore=shutil.ignore_patterns('*.ipynb', '_quarto.yml'))
    for f in ('settings.ini', '_quarto.yml'): shutil.copy(ROOT / f, root / f)
    shutil.copy(ROOT / 'nbs' / 'index.ipynb', root / 'nbs' / 'index.ipynb')
    res = _cli('site', '--small', '--out', str(tmp_path / 'site'), cwd=root)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "does not exist; add the notebook or remove the entry" in res.stderr
    assert not (tmp_path / 'site').exists()


# --- the site, built with small parameters from the notebooks the test suite executes ----------

@pytest.fixture(scope='module')
def site(project, run_notebook, executed_dir, tmp_path_factory):
    "The site built from the small runs (each notebook executed once per session, shared with test_notebooks)"
    for nb in docs.source_notebooks(project.nbs): run_notebook(NBS / nb.relative_to(project.nbs))
    out = tmp_path_factory.mktemp('site') / '_docs'
    t = time.time()
    res = subprocess.run(DOCS_CLI + ['site', '--small', '--executed', str(executed_dir), '--out', str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    print(f"docs site built in {time.time() - t:.1f} s:\n{res.stdout}")
    return out, json.loads((out / 'site-manifest.json').read_text())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope='module')
def served(site):
    "The site over http on 127.0.0.1 (a thread of this process)"
    out, manifest = site
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_port}/', manifest
    server.shutdown()
    server.server_close()


@pytest.fixture(scope='module')
def browser():
    "Debian's headless Chromium, driven through Debian's chromedriver (no browser download)"
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        f"{CHROMIUM} or {CHROMEDRIVER} is missing: `make test` installs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix='lgl2o-chromium-')
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f'--user-data-dir={profile}']: opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


_PAGE_FACTS = """
const main = document.querySelector('main') || document.body;
const shown = e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
return {
  title: document.title,
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  images: Array.from(main.querySelectorAll('img')).map(i => ({src: (i.currentSrc || i.src).slice(0, 80),
                                                            complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})),
  svgs: Array.from(main.querySelectorAll('svg')).filter(shown).length,
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  errors: document.querySelectorAll('.lgl2o-error, .cell-output-error').length,
  outputs: Array.from(main.querySelectorAll('.jp-OutputArea-output, .cell-output')).map(e => e.innerText).join('\\n'),
  text: document.body.innerText,
};
"""


def _status(url):
    try:
        with urlopen(url, timeout=30) as r: return r.status, r.read().decode('utf-8', 'replace')
    except HTTPError as e: return e.code, ''


@pytest.fixture(scope='module')
def visited(served, browser):
    "What Chromium finds on every page of the site: {page path: facts}"
    base, manifest = served
    t, facts = time.time(), {}
    for page in manifest['pages']:
        status, _ = _status(base + page['out'])
        browser.get(base + page['out'])
        facts[page['out']] = {'status': status, **browser.execute_script(_PAGE_FACTS)}
    print(f"{len(facts)} pages opened in Chromium in {time.time() - t:.1f} s")
    return base, manifest, facts


def test_every_page_loads(visited):
    "Each page answers 200 and shows its title; the sidebar's pages are all linked from the home page"
    base, manifest, facts = visited
    for page in manifest['pages']:
        f = facts[page['out']]
        assert f['status'] == 200, page
        assert page['title'] in f['title'], (page['out'], f['title'])
    home_links = {urldefrag(l)[0] for l in facts['index.html']['links']}
    pages = {p['src']: p['out'] for p in manifest['pages']}
    for src in docs.sidebar_notebooks(manifest['sidebar']):
        assert base + pages[src] in home_links, f"the home page does not link {src} ({pages[src]})"


def test_internal_links_resolve(visited):
    "Every link to this site reaches a page that exists, and its #anchor exists on that page"
    base, _, facts = visited
    ids = {base + out: set(f['ids']) for out, f in facts.items()}
    broken, checked = [], {}
    for out, f in facts.items():
        for link in f['links']:
            if not link.startswith(base): continue
            url, frag = urldefrag(link)
            if url not in checked: checked[url] = _status(url)
            status, body = checked[url]
            if status != 200: broken.append(f"{out}: {link} ({status})"); continue
            if frag:
                known = ids.get(url) or set(re.findall(r'\sid="([^"]+)"', body))
                if frag not in known: broken.append(f"{out}: {link} (no #{frag} there)")
    assert not broken, f"{len(broken)} broken links:\n" + '\n'.join(broken[:40])
    assert len(checked) >= len(facts)


def test_figures_present(visited):
    "Every image loads with a non-zero size, and each page shows at least the figures its notebook made"
    _, manifest, facts = visited
    for page in manifest['pages']:
        f = facts[page['out']]
        bad = [i for i in f['images'] if not (i['complete'] and i['w'] > 0 and i['h'] > 0)]
        assert not bad, (page['out'], bad)
        assert len(f['images']) + f['svgs'] >= page['figures'], (page['out'], len(f['images']), f['svgs'], page['figures'])
    assert sum(p['figures'] for p in manifest['pages']) > 0, "no page has a figure: the notebooks' plots are missing"


def test_no_page_shows_an_error(visited):
    "No Python traceback and no error output on any page"
    _, _, facts = visited
    for out, f in facts.items():
        assert 'Traceback (most recent call last)' not in f['text'], out
        assert f['errors'] == 0, out


_MATH_FACTS = """
const done = arguments[arguments.length - 1];
const facts = () => {
  const main = document.querySelector('main') || document.body;
  const copy = main.cloneNode(true);
  copy.querySelectorAll('pre, code, script, style, mjx-container').forEach(e => e.remove());
  const mj = window.MathJax;
  return {
    loaded: !!(mj && mj.startup && mj.startup.document),
    raw: (copy.textContent.match(/\\$[^$\\n]{1,80}\\$/g) || []).slice(0, 5),
    containers: Array.from(main.querySelectorAll('mjx-container')).map(c => c.textContent).slice(0, 200),
    tex: mj && mj.startup && mj.startup.document ? mj.startup.document.getMathItemsWithin(main).map(m => m.math) : [],
  };
};
if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
  window.MathJax.startup.promise.then(() => done(facts()), e => done({error: String(e)}));
} else { setTimeout(() => done(facts()), 3000); }
"""


def test_math_renders_offline(visited, browser):
    "MathJax comes from the site itself (no network): every page typesets its TeX, and no raw $...$ is left in the text"
    base, manifest, _ = visited
    browser.set_script_timeout(60)
    seen = {}
    for page in manifest['pages']:
        browser.get(base + page['out'])
        f = browser.execute_async_script(_MATH_FACTS)
        assert 'error' not in f, (page['out'], f)
        assert f['loaded'], f"{page['out']}: MathJax did not load (site_libs/mathjax/ missing?)"
        assert not f['raw'], f"{page['out']} shows TeX that MathJax did not typeset: {f['raw']}"
        seen[page['out']] = f
    paper = seen['papers/lgl2o.html']
    assert r'\mu' in paper['tex'], paper['tex'][:20]        # "$\mu$-strongly convex" in the paper's claims
    assert any('\u03bc' in c for c in paper['containers']), "the formula \\mu did not render as mu"
    assert sum(len(f['containers']) for f in seen.values()) >= 10


def test_no_page_leaks_warnings_or_paths(visited):
    "The cells' outputs show no warning, traceback, tqdm widget complaint or path of the machine that built the site"
    _, _, facts = visited
    pattern = re.compile(r'\w*Warning:|UserWarning|IProgress|Traceback \(most recent|(?<![\w.-])/(?:work|home|tmp|root)/|site-packages|[\w/]\.venv/')
    leaks = [f"{out}: {line.strip()[:160]}" for out, f in facts.items() for line in f['outputs'].splitlines() if pattern.search(line)]
    assert any(f['outputs'] for f in facts.values())
    assert not leaks, f"{len(leaks)} leaked lines:\n" + '\n'.join(leaks[:30])


def test_home_page_shows_the_headline_figure(visited):
    "The home page shows the guard against its components: a figure that loaded, with its caption"
    _, _, facts = visited
    home = facts['index.html']
    loaded = [i for i in home['images'] if i['complete'] and i['w'] > 0 and i['h'] > 0]
    assert loaded, f"the home page shows no figure: {home['images']}"
    assert 'LossGuard over the two' in home['text'] and 'final training loss' in home['text']


def test_reproduced_page_gathers_every_paper(visited, executed_dir, project):
    "The generated papers/reproduced page is in the sidebar and shows every paper notebook's claims, as its executed copy computed them"
    _, manifest, facts = visited
    assert docs.sidebar_notebooks(manifest['sidebar']).count(docs.REPRODUCED_PAGE) == 1
    page = next(p for p in manifest['pages'] if p['src'] == docs.REPRODUCED_PAGE)
    papers = [nb.relative_to(project.nbs) for nb in docs.source_notebooks(project.nbs) if nb.relative_to(project.nbs).parts[0] == 'papers']
    found = docs.executed_claims(executed_dir, papers)
    assert [f['notebook'] for f in found] == sorted(p.as_posix() for p in papers), "every paper notebook must end with show_claims"
    text = facts[page['out']]['text']
    for f in found:
        assert f['paper'] in text, f['paper']
        for c in f['claims']: assert ' '.join(c['claim'].split()[:3]) in text, c['claim']


def test_home_page_screenshot(visited, browser):
    "A screenshot of the home page is kept as a test artifact, and is not blank"
    from PIL import Image
    base = visited[0]
    browser.get(base + 'index.html')
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / 'docs-home.png'
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    lo, hi = Image.open(shot).convert('L').getextrema()
    assert hi - lo > 100, "the screenshot is blank"
