"""Generation: a seed fixes the text, the temperature moves the entropy the right way, a tiny
temperature is greedy, character and byte corpora decode to readable text, and generate.py."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awd_nonnormal import lm
from awd_nonnormal.data import Dictionary, EOS
from awd_nonnormal.generate import PromptError, corpus_kind, decode, encode_prompt, sample
from awd_nonnormal.model import ModelConfig, RNNModel

ROOT = Path(__file__).resolve().parents[1]


def tiny(cutoffs=()):
    torch.manual_seed(0)
    m = RNNModel(ModelConfig(rnn_type="GRU", ntoken=40, emsize=32, nhid=16, nlayers=2, cutoffs=cutoffs))
    with torch.no_grad():  # a peaked distribution, so temperatures differ clearly
        for p in m.parameters():
            p.mul_(4)
    return m.eval()


@pytest.mark.parametrize("cutoffs", [(), (10,)])
def test_a_seed_fixes_the_text(cutoffs):
    m = tiny(cutoffs)
    a = sample(m, 30, generator=torch.Generator().manual_seed(5), prompt=[1, 2])
    b = sample(m, 30, generator=torch.Generator().manual_seed(5), prompt=[1, 2])
    c = sample(m, 30, generator=torch.Generator().manual_seed(6), prompt=[1, 2])
    assert a.ids == b.ids and len(a.ids) == 30
    assert a.ids != c.ids


def test_temperature_moves_the_entropy_the_right_way():
    """From one context the entropy of softmax(z / T) grows with T; over sampled text too."""
    m = tiny()
    first = [sample(m, 1, temperature=t, generator=torch.Generator().manual_seed(0), prompt=[3]).mean_entropy
             for t in (0.5, 1.0, 2.0)]
    assert first[0] < first[1] < first[2] < math.log(40)
    long = [sample(m, 200, temperature=t, generator=torch.Generator().manual_seed(0), prompt=[3]).mean_entropy
            for t in (0.5, 2.0)]
    assert long[0] < long[1]


def test_a_tiny_temperature_is_greedy():
    m = tiny()
    s = sample(m, 10, temperature=1e-4, generator=torch.Generator().manual_seed(1), prompt=[4])
    hidden, inp, greedy = m.init_hidden(1), torch.tensor([[4]]), []
    with torch.no_grad():
        for _ in range(10):
            logits, hidden = m(inp, hidden)
            greedy.append(int(logits[-1, 0].argmax()))
            inp = torch.tensor([[greedy[-1]]])
    assert s.ids == greedy


def test_character_and_byte_corpora_decode_to_text():
    chars = Dictionary(["h", "i", "_", EOS, "t", "e", "r"])
    assert corpus_kind(chars) == "char"
    ids = encode_prompt("hi there", chars, "char")
    assert [chars.idx2word[i] for i in ids] == ["h", "i", "_", "t", "h", "e", "r", "e"]
    assert decode(ids + [chars.word2idx[EOS]] + ids[:2], chars, "char") == "hi there\nhi"
    words = Dictionary(["the", "cat", EOS, "<unk>"])
    assert corpus_kind(words) == "word"
    ids = encode_prompt("the dog", words, "word")
    assert decode(ids + [2] + ids, words, "word") == "the <unk>\nthe <unk>"
    with pytest.raises(PromptError, match="dog"):
        encode_prompt("dog", Dictionary(["cat", EOS]), "word")
    byte_vocab = Dictionary([str(b) for b in "héllo".encode()] + [EOS])
    assert corpus_kind(byte_vocab) == "byte"
    ids = encode_prompt("héllo", byte_vocab, "byte")
    assert decode(ids, byte_vocab, "byte") == "héllo"


def test_generate_command_on_a_character_corpus(tmp_path):
    data = tmp_path / "chars"
    data.mkdir()
    line = " ".join("the_cat_sat") + "\n"
    for split, n in (("train", 40), ("valid", 8), ("test", 8)):
        (data / f"{split}.txt").write_text(line * n)
    mcfg = ModelConfig(rnn_type="LSTM", emsize=8, nhid=12, nlayers=2)
    tcfg = lm.TrainConfig(data=str(data), batch_size=4, bptt=10, lr=5.0, epochs=1,
                          save=str(tmp_path / "run" / "model.pt"), progress=False, device="cpu")
    ckpt = lm.run(mcfg, tcfg).paths.best
    cmd = [sys.executable, "generate.py", "--checkpoint", str(ckpt), "--words", "25", "--seed", "3",
           "--prompt", "the cat", "--device", "cpu"]
    a = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    b = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("the cat")
    assert "_" not in a.stdout  # spaces are spaces again
    out = tmp_path / "gen.txt"
    c = subprocess.run(cmd + ["--outf", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert c.returncode == 0 and out.read_text() == a.stdout
    bad = subprocess.run(cmd[:-2] + ["--prompt", "xyz"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'x'" in bad.stderr and "Traceback" not in bad.stderr
