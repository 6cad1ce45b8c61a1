"""Looking inside the model (miniglm/inside.py): the forward pass that keeps the attention
probabilities and the residual streams, checked against transformers on the HF export (both
architectures), the three views on the command line, and the Gradio page's Inside tab in a real
browser (headless Chromium)."""
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from conftest import ROOT, free_port, run_script
from miniglm import inside
from miniglm.adapters import add_adapter
from miniglm.checkpoint import load_model
from miniglm.tokenizer import GPT2
from model import GPT, GPTConfig

TEXT = "《静夜思》的作者是谁?"


def tiny_model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=GPT2.vocab_size, **kw)).eval()


@pytest.mark.parametrize("rope", [False, True])
def test_forward_inside_is_the_forward_pass(rope):
    """The kept attention is a distribution per query, the last residual stream through the final
    norm and output layer gives the logits, and the logits are the fused path's; afterwards the
    model runs its fused attention again."""
    model = tiny_model(rope=rope)
    ids = GPT2.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。")
    kept = inside.forward_inside(model, ids)
    T = len(ids)
    assert kept["attention"].shape == (2, 2, T, T) and kept["residual"].shape == (3, T, 32)
    assert torch.allclose(kept["attention"].sum(-1), torch.ones(2, 2, T), atol=1e-5)
    assert torch.all(kept["attention"].triu(1) == 0)  # causal: nothing after the query
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    assert torch.allclose(kept["logits"], logits[0], atol=1e-4)
    assert torch.allclose(inside.lens_logits(model, kept["residual"])[-1], logits[0], atol=1e-4)
    assert all(not b.attn.keep_probs and b.attn.probs is None for b in model.transformer.h)


def test_adapters_are_inside_too():
    """A LoRA changes what is kept (the same forward as the fused path's); a P-Tuning prefix's
    virtual tokens are the first keys of every attention map."""
    ids = GPT2.encode("春眠不觉晓")
    plain = inside.forward_inside(tiny_model(), ids)
    lora = add_adapter(tiny_model(), {"method": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0,
                                      "targets": ["attn.c_attn"]})
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # (B starts at zero: give the adapter something to say)
    kept = inside.forward_inside(lora, ids)
    with torch.no_grad():
        logits, _ = lora(torch.tensor([ids]))
    assert torch.allclose(kept["logits"], logits[0], atol=1e-4)
    assert not torch.allclose(kept["attention"], plain["attention"], atol=1e-3)
    prefixed = add_adapter(tiny_model(), {"method": "ptuning", "num_virtual_tokens": 3, "prefix_projection": False,
                                          "encoder_hidden_size": 16})
    kept = inside.forward_inside(prefixed, ids)
    assert kept["prefix"] == 3 and kept["attention"].shape[-1] == 3 + len(ids)
    assert kept["attention"][:, :, :, :3].sum() > 0  # every query sees the virtual tokens
    view = inside.attention_view(GPT2, ids, kept)
    assert view["keys"][:3] == ["[v0]", "[v1]", "[v2]"] and len(view["queries"]) == len(ids)


def test_views_of_a_trained_model(tiny_runs):
    """Token probabilities with alternatives, and the logit lens, whose last layer is the model's own prediction."""
    model, tok, meta = load_model(tiny_runs[1], "cpu")
    views = inside.look(model, tok, TEXT, "《静夜思》的作者是李白。", meta.get("template"))
    rows = views["tokens"]
    assert len(rows) == len(views["ids"]) - views["start"] and all(len(r["top"]) == inside.TOP_K for r in rows)
    assert all(0 <= r["prob"] <= 1 and r["top"][0][1] >= r["prob"] - 1e-6 for r in rows)
    lens = views["lens"]
    assert len(lens["top"]) == model.config.n_layer + 1
    logits = inside.forward_inside(model, views["ids"])["logits"]
    assert lens["top"][-1] == [inside.alternative_text(tok, i) for i in logits.argmax(-1).tolist()]
    scores = inside.head_scores(model, n_tokens=12, rows=2)
    assert len(scores["induction"]) == model.config.n_layer and len(scores["previous_token"][0]) == model.config.n_head
    assert all(0 <= v <= 1 for row in scores["induction"] + scores["previous_token"] for v in row)


@pytest.mark.slow
def test_visualize_inside_writes_three_pngs(tiny_runs, tmp_path):
    proc = run_script("visualize.py", "--inside", f"--out_dir={tiny_runs[1]}", f"--text={TEXT}",
                      f"--dest={tmp_path}", "--layer=2", "--head=1")
    for name in ("inside-tokens.png", "inside-attention.png", "inside-lens.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), proc.stdout
    bad = run_script("visualize.py", "--inside", f"--out_dir={tiny_runs[1]}", check=False)
    assert bad.returncode == 1 and "--inside needs --text" in bad.stderr


# ------------------------------------------------------------------ checked by transformers
def hf_inside(dest, ids):
    """transformers' eager attention probabilities (layers, heads, T, T), hidden states
    (layers + 1, T, C), and its own final norm and output layer applied to each hidden state."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(dest, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
        norm = hf.transformer.ln_f if hasattr(hf, "transformer") else hf.gpt_neox.final_layer_norm
        hidden = torch.stack([h[0] for h in out.hidden_states])
        lens = hf.get_output_embeddings()(norm(hidden[:-1]))
    return torch.stack([a[0] for a in out.attentions]), hidden, lens, norm


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["rotary", "learned"])
def test_transformers_sees_the_same_inside(architecture, vocab_runs, learned_positions_bpe, tmp_path):
    """On the export (GPT-NeoX for rotary positions, GPT-2 for learned ones) with eager attention,
    transformers' attention probabilities, hidden states and logit lens are the project's; a model
    with two heads' queries swapped is told apart."""
    run = vocab_runs["bpe"] / "pre" if architecture == "rotary" else learned_positions_bpe
    run_script("export_hf.py", f"--out_dir={run}", f"--dest={tmp_path / 'hf'}")
    model, tok, _ = load_model(run, "cpu")
    ids = tok.encode("《静夜思》\n作者:李白\n床前明月光，疑是地上霜。")
    ours = inside.forward_inside(model, ids)
    attentions, hidden, lens, norm = hf_inside(tmp_path / "hf", ids)
    L = model.config.n_layer
    assert attentions.shape == ours["attention"].shape
    assert torch.allclose(attentions, ours["attention"], atol=1e-5)
    # transformers' last hidden state is after the final norm; the others are the residual stream
    assert torch.allclose(hidden[:L], ours["residual"][:L], atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(hidden[L], norm(ours["residual"][L]), atol=1e-4)
    assert torch.allclose(lens, inside.lens_logits(model, ours["residual"])[:L], atol=1e-3)
    # the check can fail: the first layer's heads 0 and 1 swap their queries
    hs = model.config.n_embd // model.config.n_head
    with torch.no_grad():
        w = model.transformer.h[0].attn.c_attn.weight  # (3C, C): the queries' rows first, head by head
        w[:2 * hs] = torch.cat([w[hs:2 * hs], w[:hs]])
    swapped = inside.forward_inside(model, ids)
    assert not torch.allclose(attentions[0], swapped["attention"][0], atol=1e-3)


# ------------------------------------------------------------------ the Inside tab in a browser
def chromium():
    """(chromium, chromedriver) paths, or a skip that says what to install."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -r requirements.txt)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver; "
                    "bash setup.sh --test installs them where apt can)")
    return browser, driver


@pytest.mark.slow
def test_inside_tab_in_a_real_browser(tiny_runs, tmp_path):
    """sample_gradio.py served on 127.0.0.1, driven by headless Chromium: the Inside tab shows an
    answer's tokens (hovering one shows its alternatives), the attention maps and the logit lens."""
    browser, driver_path = chromium()
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = subprocess.Popen([sys.executable, "sample_gradio.py", f"--out_dir={tiny_runs[1]}",
                               f"--out_dir={tiny_runs[0]}", "--port", str(port), "--device", "cpu"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, 90)
        tab = wait.until(seen.element_to_be_clickable((By.ID, "inside-tab-button")))
        tab.click()
        wait.until(seen.element_to_be_clickable((By.CSS_SELECTOR, "#inside-go"))).click()
        tokens = wait.until(seen.presence_of_all_elements_located((By.CSS_SELECTOR, "#inside-tokens .tok")))
        alternatives = tokens[0].find_element(By.CSS_SELECTOR, ".alts")
        assert not alternatives.is_displayed()
        ActionChains(driver).move_to_element(tokens[0]).perform()
        wait.until(lambda d: alternatives.is_displayed())
        assert len(alternatives.text.splitlines()) == inside.TOP_K
        cells = driver.find_elements(By.CSS_SELECTOR, "#inside-lens td")
        assert cells and "rank" in cells[0].get_attribute("title")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#inside-attention img"))
        assert "iteration" in driver.find_element(By.CSS_SELECTOR, "#inside-note").text  # which weights
        driver.save_screenshot(str(tmp_path / "inside.png"))
        if os.environ.get("MINIGLM_SCREENSHOT"):  # docs/inside-gradio.png is made this way
            driver.save_screenshot(os.environ["MINIGLM_SCREENSHOT"])
        assert (tmp_path / "inside.png").stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
