"""minprefix.metrics against its references: sacrebleu (BLEU, defaults) and rouge-score (ROUGE, no stemmer).

Tolerance 1e-6 on sacrebleu's 0-100 BLEU scale and on ROUGE's 0-1 scale. The bulk comparison uses sentence pairs
built at test time from the VADER snippets in the shared folder ($MINPREFIX_SHARED, else <repo>/../shared).
"""
import math
import os
import random
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer, tokenize as rouge_tokenize
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from minprefix.metrics import corpus_bleu, rouge_l, rouge_n, sentence_bleu, tokenize_13a, tokenize_rouge

TOL = 1e-6
SHARED = Path(os.environ.get('MINPREFIX_SHARED', Path(__file__).resolve().parents[1].parent / 'shared'))
VADER = SHARED / 'data' / 'vader-snippets'
ROUGE = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=False)


def ref_corpus_bleu(hyps, refs):
    """sacrebleu wants one stream per reference position; None marks a segment with fewer references."""
    k = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(k)]
    return sacrebleu.corpus_bleu(hyps, streams).score


def ours_rouge(prediction, target):
    return {'rouge1': rouge_n(prediction, target, 1), 'rouge2': rouge_n(prediction, target, 2),
            'rougeL': rouge_l(prediction, target)}


def rouge_mismatches(prediction, target):
    ref = ROUGE.score(target, prediction)  # rouge_score's order is (target, prediction)
    ours = ours_rouge(prediction, target)
    return [(k, ours[k], ref[k]) for k in ref
            if any(abs(a - b) > TOL for a, b in zip(ours[k], ref[k]))]


# ---- the reference libraries' published test vectors

# sacrebleu README / test_bleu.py: three hypotheses, two reference streams (transposed here: refs per hypothesis)
README_HYPS = ['The dog bit the man.', "It wasn't surprising.", 'The man had just bitten him.']
README_REFS = [['The dog bit the man.', 'The dog had bit the man.'],
               ['It was not unexpected.', 'No one was surprised.'],
               ['The man bit him first.', 'The man had bitten the dog.']]


def test_sacrebleu_readme_corpus():
    assert abs(corpus_bleu(README_HYPS, README_REFS) - 48.530827) < TOL
    assert corpus_bleu(['', '', ''], README_REFS) == 0.0  # empty hypotheses count, they are not dropped


def test_sacrebleu_issue_98_sentence():
    # test_sentence_bleu.py, 'exp' smoothing, 13a: 8.493 (published to 1e-3)
    ref = 'produc\u0163ia de zah\u0103r brut se exprim\u0103 \u00een zah\u0103r alb;'
    hyp = 'Produc\u021bia de zah\u0103r prim\u0103 va fi exprimat\u0103 \u00een ceea ce prive\u0219te zah\u0103rul alb;'
    assert abs(sentence_bleu(hyp, [ref]) - 8.493) < 1e-3
    assert abs(sentence_bleu(hyp, [ref]) - sacrebleu.sentence_bleu(hyp, [ref]).score) < TOL


def test_sacrebleu_issue_141_no_match_is_zero():
    assert sentence_bleu('this is a cat', ['okay thanks']) == 0.0


def test_sacrebleu_published_statistics():
    # test_bleu.py gives matches [4, 2, 1, 0] of totals [6, 5, 4, 3] for this pair, c = 6, r = 8;
    # 'exp' smoothing turns the first zero-match order into 1 / (2 * 3).
    hyp, ref = 'am I am a character sequence', 'I am a symbol string sequence a a'
    expected = 100 * math.exp(1 - 8 / 6) * (4 / 6 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert abs(corpus_bleu([hyp], [[ref]]) - expected) < TOL
    assert abs(sentence_bleu(hyp, [ref]) - expected) < TOL  # all four orders present: effective order is 4


@pytest.mark.parametrize('target, prediction, expected', [
    # rouge_scorer_test.py: (rouge type, precision, recall, F)
    ('testing one two', 'testing', [('rouge1', 1, 1 / 3, 1 / 2)]),
    ('testing one two', 'testing one', [('rouge2', 1, 1 / 2, 2 / 3), ('rougeL', 1, 2 / 3, 4 / 5),
                                        ('rouge1', 1, 2 / 3, 4 / 5)]),
    ('testing one two', 'testing two', [('rougeL', 1, 2 / 3, 4 / 5)]),
    ('testing one two', '', [('rouge1', 0, 0, 0), ('rouge2', 0, 0, 0), ('rougeL', 0, 0, 0)]),
])
def test_rouge_score_unit_vectors(target, prediction, expected):
    ours = ours_rouge(prediction, target)
    for kind, p, r, f in expected:
        assert ours[kind] == pytest.approx((p, r, f), abs=TOL), kind


# rouge_score's testdata/{target,prediction}.txt, lines 1 and 2, scored by the original ROUGE-1.5.5 perl script
ROUGE155_TARGETS = [
    "ZfbCUIUuePaiLVUlCaUXxkpu XPeWing tUHfPMuZ',-Xd Y BrUgVJing M-HV.-DgdDaY.rFDJCRing Ht-LM EKBDXkME,yz'RBr "
    "q'wtion wIojNbN wL,b .a-'XdQggyFl jB-RPP'iyOIcUxer tKM L\n",
    "KsJdPByEtAor fE-Qg Dpdbring cw-WeFyu vC MoBL Xdn g wkvcEiGvKtion BDFhrpMtion psing sbKao Q m qiing LMmer "
    "HqqLFXe,XPY,J XsurkMer ,ed nB'wH'bWVHjWFEing tQ.saefZwJtKrTlixYpMMsJing UCAPwNHeYVjDing c T BUySKtion "
    "gMPfJpwGw p'NvxAoping eu pBwMBKV'I DNxqelhu,PHPxDEq,mtion SN\n",
]
ROUGE155_PREDICTIONS = [
    "rFDJCRtion Ht-LM EKtDXkME,yz'RBr q'wer wrojNbN wL,b .a-'XdQggyFl jB-RPP'iyOIcUxi\n",
    "n cw-WeFyu vC MoBL Xdn g wkvcEiGvKtion BDFhrpMer pstion sbKao Q m qier LMmed HqqLFXe,XPY,J XsurkMeo ,ed "
    "nB'wH'bWVHjWFEer tQ.saefZwJtKrTlixYpMMNJtion UCAPwNHeYVjD\n",
]
ROUGE155 = [  # (P, R, F) for rouge1, rouge2, rougeL, to 5 places
    {'rouge1': (0.68750, 0.40741, 0.51163), 'rouge2': (0.53333, 0.30769, 0.39024),
     'rougeL': (0.68750, 0.40741, 0.51163)},
    {'rouge1': (0.65385, 0.40476, 0.50000), 'rouge2': (0.48000, 0.29268, 0.36364),
     'rougeL': (0.65385, 0.40476, 0.50000)},
]


@pytest.mark.parametrize('i', [0, 1])
def test_rouge_against_rouge155(i):
    ours = ours_rouge(ROUGE155_PREDICTIONS[i], ROUGE155_TARGETS[i])
    for kind, expected in ROUGE155[i].items():
        assert ours[kind] == pytest.approx(expected, abs=5e-6), kind


# ---- edge cases

TRICKY = [
    '',
    '   ',
    'It costs $1,000.50 -- or 3-4 payments (see p. 12)!',
    'e-mail: foo@bar.com; 10.5% vs. 9,5%... [sic] {x} ~y~ `z` ^_^ a|b a\\b',
    'U.S.A. in the 1990s\' "quoted" &quot;x&quot; &amp;quot; &lt;tag&gt; AT&T',
    'skip <skipped> this, line-\nbreak\nand a\r\nnewline',
    'trailing spaces and tabs \t ',
    'a hyphen at the very end-\n',  # sacrebleu rstrips first, so this '-\n' is not joined away
    '1.5,2.5 .5 5. ,5 5, a.b a,b 3-d x-3 3-3 ---',
    "don't won't y'all 'quoted' o'clock",
    'Caf\u00e9 \u00c9COLE na\u00efve Stra\u00dfe \u0130stanbul \u212a 42\u00b0C \u00bd \u2014 \u201cfancy\u201d',
    'MiXeD CaSe mixed case MIXED CASE',
]


@pytest.mark.parametrize('line', TRICKY)
def test_tokenize_13a_matches_sacrebleu(line):
    assert tokenize_13a(line) == Tokenizer13a()(line.rstrip())


@pytest.mark.parametrize('line', TRICKY)
def test_tokenize_rouge_matches_rouge_score(line):
    assert tokenize_rouge(line) == rouge_tokenize.tokenize(line, None)


@pytest.mark.parametrize('hyp', TRICKY)
@pytest.mark.parametrize('ref', TRICKY)
def test_tricky_pairs(hyp, ref):
    assert abs(sentence_bleu(hyp, [ref]) - sacrebleu.sentence_bleu(hyp, [ref]).score) < TOL
    assert abs(corpus_bleu([hyp, ref], [[ref], [hyp]]) - ref_corpus_bleu([hyp, ref], [[ref], [hyp]])) < TOL
    assert not rouge_mismatches(hyp, ref)


def test_empty_hypothesis():
    assert sentence_bleu('', ['a cat sat on the mat']) == 0.0
    assert corpus_bleu(['', ''], [['a b c d'], ['e f g h']]) == 0.0
    assert rouge_n('', 'a cat', 1) == (0, 0, 0) and rouge_l('', 'a cat') == (0, 0, 0)
    assert rouge_l('a cat', '') == (0, 0, 0)


def test_no_overlap():
    assert sentence_bleu('green ideas sleep', ['a cat sat on the mat']) == 0.0
    assert rouge_n('green ideas sleep', 'a cat sat', 1) == (0, 0, 0)
    assert rouge_l('green ideas sleep', 'a cat sat') == (0, 0, 0)


def test_identical():
    s = 'The quick brown fox jumps over the lazy dog.'
    assert abs(sentence_bleu(s, [s]) - 100) < TOL and abs(corpus_bleu([s], [[s]]) - 100) < TOL
    assert abs(sentence_bleu('a test', ['a test']) - 100) < TOL  # effective order: only orders 1 and 2
    # corpus BLEU never uses effective order: no 3-grams means p_3 = 0 and BLEU 0, in sacrebleu too
    assert corpus_bleu(['a test'], [['a test']]) == 0.0 == sacrebleu.corpus_bleu(['a test'], [['a test']]).score
    for score in ours_rouge(s, s).values():
        assert score == pytest.approx((1, 1, 1), abs=TOL)


def test_mixed_case():
    # BLEU is case-sensitive (sacrebleu's default lowercase=False); ROUGE lowercases
    assert sentence_bleu('THE CAT SAT ON THE MAT', ['the cat sat on the mat']) == 0.0
    assert rouge_l('THE CAT SAT ON THE MAT', 'the cat sat on the mat') == pytest.approx((1, 1, 1))


def test_closest_reference_length_tie_takes_shorter():
    # hypothesis 5 tokens, references 4 and 6 tokens: both 1 away; r = 4 gives BP = 1, r = 6 would give exp(-0.2)
    hyp = 'a b c d e'
    for refs in (['a b c d', 'a b c d e f'], ['a b c d e f', 'a b c d']):
        assert abs(sentence_bleu(hyp, refs) - 100) < TOL
        assert abs(sacrebleu.sentence_bleu(hyp, refs).score - 100) < TOL


def test_bad_arguments():
    with pytest.raises(ValueError, match='n must be'):
        rouge_n('a', 'a', 0)
    with pytest.raises(ValueError, match='reference lists'):
        corpus_bleu(['a', 'b'], [['a']])
    with pytest.raises(ValueError, match='at least one reference'):
        sentence_bleu('a', [])


# ---- bulk comparison on VADER snippets

def _perturb(words, rng):
    """One random edit of a word list: drop, swap, duplicate, recase, punctuate or truncate."""
    w = list(words)
    kind = rng.choice(['drop', 'swap', 'dup', 'case', 'punct', 'truncate', 'shuffle'])
    if kind == 'drop' and len(w) > 1:
        w = [x for x in w if rng.random() > 0.25] or w[:1]
    elif kind == 'swap' and len(w) > 1:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(w) - 1)
            w[i], w[i + 1] = w[i + 1], w[i]
    elif kind == 'dup':
        i = rng.randrange(len(w))
        w.insert(i, w[i])
    elif kind == 'case':
        w = [x.upper() if rng.random() < 0.3 else x.lower() if rng.random() < 0.3 else x for x in w]
    elif kind == 'punct':
        i = rng.randrange(len(w))
        w[i] += rng.choice([',', '.', '!', ' -', '&amp;', '3-4', '1,000.5', '"', "'s"])
    elif kind == 'truncate':
        w = w[:rng.randint(1, 3)]
    elif kind == 'shuffle':
        rng.shuffle(w)
    return w


@pytest.fixture(scope='module')
def snippets():
    if not VADER.is_dir():
        pytest.skip(f'VADER snippets not found at {VADER}; set MINPREFIX_SHARED to the shared folder')
    texts = []
    for path in sorted(VADER.glob('*.txt')):
        for line in path.read_text(encoding='utf-8').splitlines():
            if line.strip():
                texts.append(line.split('\t', 2)[2])
    return texts


@pytest.fixture(scope='module')
def pairs(snippets):
    """(hypothesis, references, kind) triples; fixed seed, so the same pairs every run."""
    rng = random.Random(1234)
    out = []
    for _ in range(150):  # unrelated snippets: little overlap
        hyp, ref = rng.sample(snippets, 2)
        out.append((hyp, [ref], 'random'))
    for _ in range(350):  # a perturbed copy of the reference
        ref = rng.choice(snippets)
        words = ref.split()
        for _ in range(rng.randint(1, 3)):
            words = _perturb(words, rng)
        out.append((' '.join(words), [ref], 'perturbed'))
    for _ in range(100):  # several references: the source, an edited copy, and unrelated snippets
        ref = rng.choice(snippets)
        refs = [ref, ' '.join(_perturb(ref.split(), rng))] + rng.sample(snippets, rng.randint(0, 2))
        rng.shuffle(refs)
        out.append((' '.join(_perturb(ref.split(), rng)), refs, 'multi'))
    return out


def test_tokenizers_on_snippets(snippets):
    lines = snippets[::4] + [s for s in snippets if '&' in s]  # a quarter keeps it fast; all HTML entities
    tok = Tokenizer13a()
    assert [tokenize_13a(s) for s in lines] == [tok(s.rstrip()) for s in lines]
    assert [tokenize_rouge(s) for s in lines] == [rouge_tokenize.tokenize(s, None) for s in lines]


def test_sentence_bleu_every_pair(pairs):
    assert len(pairs) >= 500
    bad = [(h, r, ours, ref) for h, r, _ in pairs
           if abs((ours := sentence_bleu(h, r)) - (ref := sacrebleu.sentence_bleu(h, r).score)) > TOL]
    assert not bad, f'{len(bad)} of {len(pairs)} differ from sacrebleu, first: {bad[0]}'


def test_corpus_bleu_on_sub_corpora(pairs):
    subs = {'all': pairs}
    for kind in ('random', 'perturbed', 'multi'):
        subs[kind] = [p for p in pairs if p[2] == kind]
    for start in range(0, len(pairs), 97):
        subs[f'[{start}:{start + 97}]'] = pairs[start:start + 97]
    subs['short'] = [p for p in pairs if len(p[0].split()) <= 3][:20]  # few 4-grams: exercises the p_n = 0 path
    for name, sub in subs.items():
        hyps, refs = [p[0] for p in sub], [p[1] for p in sub]
        ours, ref = corpus_bleu(hyps, refs), ref_corpus_bleu(hyps, refs)
        assert abs(ours - ref) < TOL, f'sub-corpus {name} ({len(sub)} pairs): ours {ours}, sacrebleu {ref}'


def test_rouge_every_pair(pairs):
    bad = [(h, r[0], m) for h, r, _ in pairs if (m := rouge_mismatches(h, r[0]))]
    assert not bad, f'{len(bad)} of {len(pairs)} differ from rouge_score, first: {bad[0]}'
