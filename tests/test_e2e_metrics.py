"""minprefix.e2e_metrics against references we did not write.

- The whole pipeline: values printed by e2e-metrics itself (tuetschek/e2e-metrics at 1b9c4d8, measure_scores.py's
  run_pymteval and run_coco_eval, i.e. `measure_scores.py -p`, with the Java PTBTokenizer) on the first 150 tables
  of the E2E validation set ($MINPREFIX_SHARED/data/e2e, else <repo>/../shared).
- ROUGE-L and CIDEr: PyPI's pycocoevalcap Rouge and Cider, fed the same tokenized strings. Its Cider is the
  coco-caption CiderScorer that e2e-metrics bundles (same arithmetic, only py2/3 shims differ): CIDEr-D in all but
  name (clipping, Gaussian length penalty sigma 6, x10, idf from the references); PyPI has no CiderD class.
- BLEU: sacrebleu (lowercase=True) where pymteval and sacrebleu coincide; hand-computed values where they do not.
- NIST: its published definition (Doddington 2002, mteval-v13a), examples computed by hand in the comments.
- The tokenizer: outputs of Stanford CoreNLP 3.4.1's PTBTokenizer (the jar pycocoevalcap runs), and the jar
  itself on every validation reference where Java is installed.
Tolerance: 1e-9 relative.
"""
import gzip
import math
import os
import shutil
from pathlib import Path

import pytest
import sacrebleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from minprefix.e2e_metrics import (NIST_BETA, coco_cider, coco_rouge_l, e2e_scores, mteval_tokenize, ptb_tokenize,
                                   pymteval_bleu, pymteval_nist)

REL = 1e-9
SHARED = Path(os.environ.get('MINPREFIX_SHARED', Path(__file__).resolve().parents[1].parent / 'shared'))
E2E_VALID = SHARED / 'data' / 'e2e' / 'valid.txt.gz'


def close(a, b, rel=REL):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def load_tables(path=E2E_VALID):
    """The references of each table, tables in order of first appearance."""
    groups = {}
    with gzip.open(path, 'rt', encoding='utf-8') as f:
        for line in f:
            table, text = line.rstrip('\n').split('||')
            groups.setdefault(table, []).append(text)
    return list(groups.values())


@pytest.fixture(scope='module')
def tables():
    return load_tables()[:150]


def drop_every_fifth(text):
    return ' '.join(w for i, w in enumerate(text.split()) if i % 5 != 2)


def corpus(tables, case):
    """'first': each table's first reference against the others; 'dropped': its last reference with every fifth
    word dropped, against all of them."""
    if case == 'first':
        return [g[0] for g in tables], [g[1:] for g in tables]
    return [drop_every_fifth(g[-1]) for g in tables], tables


# ---- the whole pipeline, against e2e-metrics' own output

# measure_scores.py's run_pymteval and run_coco_eval on these two corpora (lines stripped, as load_data gives them)
OFFICIAL = {  # BLEU (0-1), NIST, ROUGE_L (0-1), CIDEr; METEOR was 0.45133 and 0.44035
    'first': (0.5952621510066481, 8.05129708535322, 0.6576094961769411, 1.7139509436497542),
    'dropped': (0.5120099353573047, 7.36227541909965, 0.8697942565484285, 1.4013132803314576),
}


@pytest.mark.parametrize('case', ['first', 'dropped'])
def test_matches_measure_scores(tables, case):
    scores = e2e_scores(*corpus(tables, case))
    bleu, nist, rouge_l, cider = OFFICIAL[case]
    assert close(scores['bleu'], 100 * bleu) and close(scores['nist'], nist)
    assert close(scores['rouge_l'], 100 * rouge_l) and close(scores['cider'], cider)


def test_e2e_scores_is_its_parts(tables):
    hyps, refs = corpus(tables[:40], 'dropped')
    scores = e2e_scores(hyps, refs)
    assert list(scores) == ['bleu', 'nist', 'rouge_l', 'cider']
    assert scores == {'bleu': 100 * pymteval_bleu(hyps, refs), 'nist': pymteval_nist(hyps, refs),
                      'rouge_l': 100 * coco_rouge_l(hyps, refs), 'cider': coco_cider(hyps, refs)}


# ---- ROUGE-L and CIDEr against pycocoevalcap, on the same tokens

def coco_reference(scorer, hyps, refs):
    """pycocoevalcap's corpus score: it takes {id: [tokenized hypothesis]} and {id: [tokenized references]}."""
    res = {i: [h] for i, h in enumerate(hyps)}
    gts = {i: list(rs) for i, rs in enumerate(refs)}
    return float(scorer.compute_score(gts, res)[0])


EDGE = {  # small corpora, already tokenized as the PTBTokenizer leaves them
    'empty hypothesis': (['', 'the cat sat on the mat', 'a dog'],
                         [['the cat', 'a cat sat'], ['the cat sat on the mat'], ['a dog barks']]),
    'single references': (['a b c', 'b c d e', 'x'], [['a b c d'], ['e d c b'], ['x y']]),
    # the scorer's length counts bigrams, max(words - 1, 0): only an empty text makes that differ from a word
    # count, and then the cosine is 0 anyway
    'one-word hypotheses': (['x', 'y', ''], [['x z', 'x'], ['y'], ['q']]),
    'repeated words (clipping)': (['the the the the', 'cat cat'], [['the cat', 'the the dog'], ['a cat']]),
    'one table': (['the cat sat'], [['the cat sat', 'a cat']]),  # ln N = 0: every CIDEr weight is 0
}


@pytest.mark.parametrize('case', ['first', 'dropped'])
def test_rouge_l_and_cider_match_pycocoevalcap_on_e2e(tables, case):
    hyps, refs = corpus(tables, case)
    hyps, refs = [ptb_tokenize(h) for h in hyps], [[ptb_tokenize(r) for r in rs] for rs in refs]
    assert close(coco_rouge_l(hyps, refs, tokenize=False), coco_reference(Rouge(), hyps, refs))
    assert close(coco_cider(hyps, refs, tokenize=False), coco_reference(Cider(), hyps, refs))


@pytest.mark.parametrize('case', list(EDGE))
def test_rouge_l_and_cider_match_pycocoevalcap_edge_cases(case):
    hyps, refs = EDGE[case]
    assert close(coco_rouge_l(hyps, refs, tokenize=False), coco_reference(Rouge(), hyps, refs))
    assert close(coco_cider(hyps, refs, tokenize=False), coco_reference(Cider(), hyps, refs))


def test_rouge_l_by_hand():
    # 'a b c' vs 'a c' and 'a b d e': LCS 2 and 2; P = max(2/3, 2/3), R = max(2/2, 2/4) = 1
    p, r = 2 / 3, 1.0
    assert close(coco_rouge_l(['a b c'], [['a c', 'a b d e']]), 2.44 * p * r / (r + 1.44 * p))
    assert coco_rouge_l([''], [['a b']]) == 0.0 and coco_rouge_l(['x y'], [['a b']]) == 0.0


def test_cider_d_by_hand():
    # Two tables, so ln N = ln 2; every n-gram occurs in one table's references: weight tf * ln 2.
    # Table 1, 'a b' vs 'a b c': unigram cosine 2/(sqrt 2 sqrt 3), bigram 1/(1 * sqrt 2), no 3- or 4-grams in the
    # hypothesis: 0; lengths 2 vs 3 give the penalty e^(-1/72). Table 2, 'z' vs 'z': unigram cosine 1.
    first = 10 / 4 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72)
    second = 10 / 4 * 1.0
    assert close(coco_cider(['a b', 'z'], [['a b c'], ['z']]), (first + second) / 2)
    # clipping: 'a a' vs 'a b' gives min(2w, w) * w / (2w * sqrt(2) w) = 1/(2 sqrt 2) for unigrams, not 1/sqrt 2
    clipped = 10 / 4 * (1 / (2 * math.sqrt(2))) * math.exp(0)
    assert close(coco_cider(['a a', 'q'], [['a b'], ['r']]), (clipped + 0) / 2)
    assert coco_cider(['a b'], [['a b']]) == 0.0  # one table: ln 1 = 0, every weight is 0


# ---- BLEU: sacrebleu where it coincides with pymteval, hand-computed values where it does not

def sacrebleu_lowercase(hyps, refs):
    k = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(k)]
    return sacrebleu.corpus_bleu(hyps, streams, lowercase=True, force=True)  # force: E2E text is tokenized


@pytest.mark.parametrize('case', ['first', 'dropped'])
def test_bleu_matches_sacrebleu_where_they_coincide(tables, case):
    hyps, refs = corpus(tables, case)
    ref = sacrebleu_lowercase(hyps, refs)
    # They differ only (1) when an order has no match in the whole corpus (sacrebleu smooths, pymteval floors
    # the count at 1e-15) and (2) for hypotheses shorter than 4 tokens (pymteval counts len - n + 1 < 0 n-grams,
    # sacrebleu 0). Neither happens here:
    assert all(ref.counts) and min(len(mteval_tokenize(h)) for h in hyps) >= 4
    assert close(pymteval_bleu(hyps, refs), ref.score / 100)


def test_bleu_no_smoothing():
    # 'a b c d' vs 'a b c e': matches 3/4, 2/3, 1/2, 0/1; BP = 1 (c = r = 4). pymteval: 4-gram count 1e-15.
    assert close(pymteval_bleu(['a b c d'], [['a b c e']]), (3 / 4 * 2 / 3 * 1 / 2 * 1e-15) ** 0.25)
    # sacrebleu's 'exp' smoothing makes the first empty order 1 / (2 * 1)
    assert close(sacrebleu_lowercase(['a b c d'], [['a b c e']]).score / 100, (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)


def test_bleu_counts_negative_ngrams_for_short_hypotheses():
    # 'a b' vs 'a b c': totals 2, 1, 0, -1 -> floored at 1e-9; matches 2, 1, 0, 0 -> floored at 1e-15.
    # BP = exp(1 - 3/2). BLEU = e^-0.5 * (1 * 1 * 1e-6 * 1e-6)^(1/4) = e^-0.5 * 1e-3
    assert close(pymteval_bleu(['a b'], [['a b c']]), math.exp(-0.5) * 1e-3)
    # With a 5-token segment: matches 6, 4, 3, 2 over totals 6, 4, 3 - 1, 2 - 2 = 0 -> 1e-9; BLEU > 1.
    assert close(pymteval_bleu(['a b c d e', 'q'], [['a b c d e'], ['q']]), (1 * 1 * 1.5 * 2e9) ** 0.25)
    assert close(sacrebleu_lowercase(['a b c d e', 'q'], [['a b c d e'], ['q']]).score, 100)


def test_bleu_empty_hypothesis_is_one_empty_token():
    # ''.split(' ') = ['']: c = 1, r = 5, BP = e^(1 - 5); totals 1, 0, -1, -2; no match:
    # (1e-15 / 1 * (1e-15 / 1e-9) ** 3) ** (1/4) = 10 ** (-33 / 4)
    assert mteval_tokenize('') == [''] and mteval_tokenize('   ') == ['']
    assert close(pymteval_bleu([''], [['a b c d e']]), math.exp(-4) * 10 ** (-33 / 4))


def test_bleu_closest_reference_and_case():
    # 4 tokens against references of 3 and 5: both 1 away, the shorter (3) is taken, so BP = 1
    assert close(pymteval_bleu(['a b c d'], [['a b c d e', 'a b c']]), 1.0)
    assert close(pymteval_bleu(['A B C D'], [['a b c d']]), 1.0)  # lowercased


# ---- NIST: the published definition, by hand

def test_nist_beta():
    # mteval-v13a: the brevity factor is 0.5 where the length ratio is 1.5 (= 1 / (2/3))
    assert close(NIST_BETA, -math.log(0.5) / math.log(1.5) ** 2)
    assert close(math.exp(-NIST_BETA * math.log(2 / 3) ** 2), 0.5)


def test_nist_two_references_by_hand():
    # hyp 'a b c d e'; refs 'a b c d e', 'a b c d f'. Reference counts: a..d 2, e f 1 (10 words); ab bc cd 2,
    # de df 1; abc bcd 2, cde cdf 1; abcd 2, bcde bcdf 1; abcde abcdf 1.
    # info(w) = log2(10 / C(w)): a..d log2 5, e log2 10  -> (4 log2 5 + log2 10) / 5 = log2 5 + 1/5
    # info(x y) = log2(C(x) / C(x y)): ab bc cd 0, de 1   -> 1/4
    # trigrams: abc bcd 0, cde log2(2/1) = 1            -> 1/3
    # 4-grams: abcd 0, bcde 1                          -> 1/2
    # 5-gram: abcde log2(2/1) = 1                       -> 1/1
    # c = 5 = mean reference length 5: no penalty.
    expected = math.log2(5) + 1 / 5 + 1 / 4 + 1 / 3 + 1 / 2 + 1
    assert close(pymteval_nist(['a b c d e'], [['a b c d e', 'a b c d f']]), expected)


def test_nist_brevity_penalty_by_hand():
    # distinct words: each unigram weighs log2(|ref|), every longer n-gram log2(1/1) = 0
    assert close(pymteval_nist(['a b c d e'], [['a b c d e f']]),
                 math.log2(6) * math.exp(-NIST_BETA * math.log(5 / 6) ** 2))
    words = [f'w{i}' for i in range(15)]
    assert close(pymteval_nist([' '.join(words[:10])], [[' '.join(words)]]), math.log2(15) * 0.5)  # ratio 2/3


def test_nist_properties():
    assert close(pymteval_nist(['a b c d e'], [['a b c d e']]), math.log2(5))  # identical: log2 of the length
    # a duplicated reference doubles every count (info unchanged) and leaves the mean reference length as it was
    hyps, refs = ['a b c d e f', 'a b x d e'], [['a b c d e', 'a c d e f g'], ['a b c d e']]
    assert close(pymteval_nist(hyps, [r + r for r in refs]), pymteval_nist(hyps, refs))
    # L averages each segment's references: 5 + (5 + 15) / 2 = 15, c = 10, ratio 2/3, factor 0.5 (the Perl
    # script's total 25 / (4 refs / 2 segments) would give 0.6). Words: a..e once, f..j twice, k..t once (25);
    # unigram info log2(25) and log2(25/2); every hypothesis n-gram longer than 1 has info 0.
    many = 'f g h i j k l m n o p q r s t'
    assert close(pymteval_nist(['a b c d e', 'f g h i j'], [['a b c d e'], ['f g h i j', many]]),
                 0.5 * (5 * math.log2(25) + 5 * math.log2(12.5)) / 10)
    assert pymteval_nist(['A B C D E'], [['a b c d e']]) == pymteval_nist(['a b c d e'], [['a b c d e']])
    assert math.isnan(pymteval_nist(['a b c d'], [['a b c d']]))  # no 5-gram at all: pymteval divides by 0


def test_nist_more_matching_references_score_higher():
    hyp = ['the cat sat on the mat today']
    one = pymteval_nist(hyp, [['the cat sat on a rug yesterday']])
    two = pymteval_nist(hyp, [['the cat sat on a rug yesterday', 'a dog sat on the mat today']])
    assert two > one > 0


# ---- tokenizers

# (input, what CoreNLP 3.4.1's PTBTokenizer -preserveLines -lowerCase gives once pycocoevalcap drops its
# PUNCTUATIONS); each pair was produced by the jar
PTB_CASES = [
    ('The Vaults pub near Café Adriatic has a 5 star rating . Prices start at £ 30 . ',
     'the vaults pub near café adriatic has a 5 star rating prices start at # 30'),
    ("It isn 't family - friendly , it 's near Café Rouge .", "it isn t family friendly it 's near café rouge"),
    ('£20-£25 , £20-25 or 20 -25 , 20- 25', '# 20 # 25 # 20-25 or 20 -25 20 25'),
    ("I don't know , we cannot , it's gonna be", "i do n't know we can not it 's gon na be"),
    ('\' Strada \' and \'Strada\' and "The Eagle"', 'strada and strada and the eagle'),
    ('kid-friendly. (near) [x] {y}', 'kid-friendly -lrb- near -rrb- -lsb- x -rsb- -lcb- y -rcb-'),
    ('wait!! what?! no! yes? end... ok..', 'wait !! what ?! no yes end ok'),
    ('1,000 10.50 5/5 5:30 -25 .5 5. 30,', '1,000 10.50 5/5 5:30 -25 .5 5 30'),
    ('Mr. Smith etc. U.S.A. e.g. centre.It', 'mr. smith etc. u.s.a. e.g. centre.it'),
    ("o'clock d'oeuvre O'Brien hors d 'oeuvres 'The Mill'", "o'clock d'oeuvre o'brien hors d oeuvres the mill"),
    ('€20 $20 ¢ #1 50% 5* a+b', '$ 20 $ 20 cents # 1 50 % 5 * a + b'),
    ('&amp; AT&T x&y', '& at&t x & y'),
    ('', ''),
    (' . , ; : - -- — – … ', ''),
    ('CAFÉ ÉCOLE', 'café école'),
    ('don’t it’s “Eagle” ‘Strada’', "do n't it 's eagle strada"),
    ('Fitzbillies , 5 out of 5 , £ 20 - 25 , 1 out of 5 , high , 3 out of 5 .',
     'fitzbillies 5 out of 5 # 20 25 1 out of 5 high 3 out of 5'),
    ('The centre.,near rated 5., a-b.;', 'the centre. near rated 5. a-b.'),
]


@pytest.mark.parametrize('text, expected', PTB_CASES)
def test_ptb_tokenize_as_corenlp(text, expected):
    assert ptb_tokenize(text) == expected


def test_mteval_tokenize():
    assert mteval_tokenize("It's £ 30 , 20-25 family-friendly Café .") == [
        "it's", '£', '30', ',', '20', '-', '25', 'family-friendly', 'café', '.']


@pytest.mark.skipif(shutil.which('java') is None, reason='extra check: needs Java for the Stanford PTBTokenizer')
def test_ptb_tokenize_matches_the_jar_on_e2e_references():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    texts = [t for g in load_tables() for t in g]
    texts += [drop_every_fifth(t).replace(' , ', ', ').replace(' .', '.').replace('£ ', '£').replace(" 's", "'s")
              for t in texts[::7]]  # and some untokenized-looking variants
    java = PTBTokenizer().tokenize({i: [{'caption': t}] for i, t in enumerate(texts)})
    assert [ptb_tokenize(t) for t in texts] == [java[i][0] for i in range(len(texts))]


# ---- arguments

def test_bad_arguments():
    with pytest.raises(ValueError, match='reference lists'):
        e2e_scores(['a', 'b'], [['a']])
    with pytest.raises(ValueError, match='at least one reference'):
        pymteval_bleu(['a'], [[]])
    with pytest.raises(ValueError, match='at least one hypothesis'):
        coco_cider([], [])
