"""The paper's numbers and claims, as data (Orhan & Pitkow, ICLR 2020, "Improved memory in
recurrent neural networks with sequential non-normal dynamics").

Losses are test losses in bits per token (PTB word: bits per word, perplexity ``2^x``), mean and
s.e.m. over 3 runs, as printed in the paper's Tables 1 and 3; Table 2 is the Henrici index
``d(W)`` of trained vanilla RNNs (mean +- s.e.m. over the successful networks).
"""

from __future__ import annotations

from typing import Dict, Tuple

#: Figure 1b: total Fisher memory of the four N = 100 networks (Ganguli et al. 2008).
FIGURE1 = {
    "claim": "J_tot = 1 for the normal networks (identity, orthogonal); the non-normal chain and "
             "chain with feedback have extensive memory, J_tot ~ O(N), bounded by N (Figure 1b), "
             "through transient amplification of a pulse (Figure 1c).",
    "normal_J_tot": 1.0,
}

#: Figure 2 (and Appendix A, Figures 7-8): decoding s_1 from h_100, chain vs orthogonal.
FIGURE2 = {
    "claim": "Without noise both linear networks decode s_1 perfectly (R^2 ~ 1); with noise "
             "(sigma 0.01, 0.1, 1) or a non-linearity (elu, tanh, relu) the chain decodes better "
             "than the orthogonal network (in-sample R^2 of 250 trials).",
}

#: Figure 3 d-f: successful runs (final validation loss < 50 % of the random baseline).
FIGURE3_COUNTS: Dict[str, Dict[str, Tuple[int, int]]] = {
    "copy": {"chain": (46, 462), "fbchain": (11, 462), "identity": (0, 594), "orthogonal": (0, 594)},
}
FIGURE3 = {
    "claim": "The non-normal initializers (chain, fbchain) reach lower validation losses with their "
             "best configuration (Figure 3a-c) and have more successful runs (Figure 3d-f) than "
             "the normal ones (identity, orthogonal). Copy-500: chain 46/462, fbchain 11/462, "
             "identity 0/594, orthogonal 0/594.",
    "T": {"copy": 500, "addition": 750, "psmnist": 784},
}

#: Table 1: vanilla RNN language models, test bits per token (mean, s.e.m.).
TABLE1: Dict[str, Dict[str, Tuple[float, float]]] = {
    "penn": {"identity": (6.550, 0.002), "orthogonal": (6.557, 0.002), "chain": (6.514, 0.001),
             "fbchain": (6.510, 0.001)},
    "pennchar": {"identity": (1.312, 0.000), "orthogonal": (1.312, 0.001), "chain": (1.308, 0.000),
                 "fbchain": (1.307, 0.000)},
    "enwik8": {"identity": (1.783, 0.003), "orthogonal": (1.843, 0.046), "chain": (1.803, 0.017),
               "fbchain": (1.774, 0.002)},
}
TABLE1_CLAIM = ("Vanilla RNN language models initialised with a non-normal chain (chain or fbchain) "
                "reach lower test losses than with identity or orthogonal initialization (fbchain "
                "is best on all three corpora).")

#: Table 2: Henrici index d(W) of trained vanilla RNNs initialised as normal networks.
TABLE2: Dict[str, Dict[str, Tuple[float, float]]] = {
    "addition": {"identity": (2.33, 1.02), "orthogonal": (2.74, 0.07)},
    "psmnist": {"identity": (1.01, 0.12), "orthogonal": (2.72, 0.08)},
}
TABLE2_CLAIM = ("Training makes normally initialised vanilla RNNs non-normal: d(W) > 0 for every "
                "successfully trained identity/orthogonal network (Table 2), and the units ordered "
                "by peak time show a hidden chain: the mean weight profile has an asymmetric bump "
                "at a positive i - j (Figure 5).")

#: Table 3: 3-layer LSTM language models, test bits per token (mean, s.e.m.).
TABLE3: Dict[str, Dict[str, Tuple[float, float]]] = {
    "penn": {"orthogonal": (5.937, 0.002), "chain": (5.935, 0.001), "plain": (5.949, 0.007),
             "mixed": (5.944, 0.004)},
    "pennchar": {"orthogonal": (1.230, 0.001), "chain": (1.230, 0.001), "plain": (1.245, 0.001),
                 "mixed": (1.227, 0.000)},
    "enwik8": {"orthogonal": (1.583, 0.001), "chain": (1.586, 0.000), "plain": (1.584, 0.002),
               "mixed": (1.577, 0.001)},
}
TABLE3_CLAIM = ("In LSTMs the chain initializer is not better than the orthogonal one; the mixed "
                "initializer (chain in the update gate, increasing ramps in the others) is best on "
                "the character-level corpora (Table 3). In trained LSTMs the input, forget and "
                "output gates have roughly monotonically increasing weight profiles, the update "
                "(tanh, g) gate a chain-like asymmetric bump (Figure 6).")
