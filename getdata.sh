#!/usr/bin/env bash
# Fetch and prepare the corpora and data sets of awd-nonnormal. Run ./getdata.sh --help.
#
# Shell side: options, fetching (cache, local mirror, curl/wget) and the per-dataset plan.
# Python side (awd_nonnormal/prepare.py, standard library only): archive checks, extraction,
# the enwik8 split, the MNIST IDX checks and the completion stamps.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREPARE="$SCRIPT_DIR/awd_nonnormal/prepare.py"
ALL_DATASETS=(penn pennchar enwik8 wikitext-2 wikitext-103 mnist toy)

PTB_URL="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
ENWIK8_URL="http://mattmahoney.net/dc/enwik8.zip"
WIKITEXT_URL="https://s3.amazonaws.com/research.metamind.io/wikitext"
MNIST_URLS=("https://ossci-datasets.s3.amazonaws.com/mnist" "http://yann.lecun.com/exdb/mnist")
MNIST_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
             t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

usage() {
    cat <<EOF
Usage: ./getdata.sh [OPTIONS] [DATASET ...]

Download and prepare data sets into DEST/<dataset>/ (all of them when none is named).

Datasets:
  penn          word-level Penn Treebank (Mikolov)     -> penn/{train,valid,test}.txt
  pennchar      character-level Penn Treebank          -> pennchar/{train,valid,test}.txt
  enwik8        first 10^8 bytes of Wikipedia, split 90M/5M/5M, one token per byte value
                                                      -> enwik8/{train,valid,test}.txt
  wikitext-2    WikiText-2 (v1, tokenized)             -> wikitext-2/{train,valid,test}.txt
  wikitext-103  WikiText-103 (v1, tokenized)           -> wikitext-103/{train,valid,test}.txt
  mnist         MNIST IDX files, kept gzipped          -> mnist/*-ubyte.gz
  toy           a synthetic corpus with a long-range dependency, made locally (no
                download; for smoke runs)                -> toy/{train,valid,test}.txt

Options:
  --dest DIR        where prepared data goes (default: \$AWD_DATA_DIR, else data/ next to
                    this script); downloads are cached in DIR/.downloads/
  --mirror DIR|URL  take the archives from a local folder (used in place, nothing is
                    downloaded) or from a URL prefix (fetch URL/<file name>) instead of
                    the original sites; default: \$AWD_DATA_MIRROR. It holds the archives
                    under their original names: simple-examples.tgz enwik8.zip
                    wikitext-2-v1.zip wikitext-103-v1.zip ${MNIST_FILES[0]}
                    ${MNIST_FILES[1]} ${MNIST_FILES[2]} ${MNIST_FILES[3]}
                    (an archive already in DEST/.downloads/ is used first)
  --force           prepare again even when a dataset is marked complete, also one prepared
                    with other settings (archives already in the cache are not downloaded
                    again); without it such a dataset is left alone and the run refused
  --sums FILE       check the archives against the SHA-256 sums in FILE, a JSON object
                    {"file name": "sha256", ...}, instead of the published sums built into
                    awd_nonnormal/prepare.py (for a mirror of re-packed archives; a file it
                    does not name is only checked for integrity); default: \$AWD_DATA_SUMS
  --enwik8-test-bytes N
                    bytes in each of enwik8's valid and test splits (default 5000000)
  --mnist-items TRAIN,TEST
                    expected MNIST item counts, or 'any' (default 60000,10000)
  -h, --help        show this help

Environment: AWD_DATA_DIR, AWD_DATA_MIRROR, AWD_DATA_SUMS (as above), PYTHON (interpreter
for awd_nonnormal/prepare.py; default python3).
Every archive is read completely (zip CRCs, the whole gzip stream) and checked against its
published SHA-256 (enwik8, WikiText, MNIST; PTB has none) before anything is extracted: a
corrupt one is refused with one line naming it and leaves DEST/<dataset> as it was.
A dataset is complete when DEST/<dataset>/.complete exists and matches its files; complete
datasets are skipped, anything else is prepared again from the cached or mirrored archive.
EOF
}

say() { printf 'getdata: %s\n' "$*" >&2; }
die() { printf 'getdata: error: %s\n' "$*" >&2; exit 1; }
usage_error() {
    printf 'getdata: error: %s\n' "$*" >&2
    echo "Run ./getdata.sh --help for usage." >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# Options

DEST="${AWD_DATA_DIR:-$SCRIPT_DIR/data}"
MIRROR="${AWD_DATA_MIRROR:-}"
SUMS="${AWD_DATA_SUMS:-}"
FORCE=0
ENWIK8_TEST_BYTES=5000000
MNIST_ITEMS="60000,10000"
REQUESTED=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "option $1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dest) need_value "$@"; DEST="$2"; shift 2 ;;
        --dest=*) DEST="${1#*=}"; shift ;;
        --mirror) need_value "$@"; MIRROR="$2"; shift 2 ;;
        --mirror=*) MIRROR="${1#*=}"; shift ;;
        --force) FORCE=1; shift ;;
        --sums) need_value "$@"; SUMS="$2"; shift 2 ;;
        --sums=*) SUMS="${1#*=}"; shift ;;
        --enwik8-test-bytes) need_value "$@"; ENWIK8_TEST_BYTES="$2"; shift 2 ;;
        --enwik8-test-bytes=*) ENWIK8_TEST_BYTES="${1#*=}"; shift ;;
        --mnist-items) need_value "$@"; MNIST_ITEMS="$2"; shift 2 ;;
        --mnist-items=*) MNIST_ITEMS="${1#*=}"; shift ;;
        --) shift; REQUESTED+=("$@"); break ;;
        -*) usage_error "unknown option '$1'" ;;
        *) REQUESTED+=("$1"); shift ;;
    esac
done

[[ "$ENWIK8_TEST_BYTES" =~ ^[1-9][0-9]*$ ]] \
    || usage_error "--enwik8-test-bytes must be a positive integer, got '$ENWIK8_TEST_BYTES'"
if [[ "$MNIST_ITEMS" == any ]]; then
    MNIST_ITEMS_JSON="{}"
elif [[ "$MNIST_ITEMS" =~ ^([0-9]+),([0-9]+)$ ]]; then
    # Leading zeros dropped (05,3 -> 5,3): the counts are recorded as JSON numbers.
    train_items="${BASH_REMATCH[1]#"${BASH_REMATCH[1]%%[!0]*}"}"
    test_items="${BASH_REMATCH[2]#"${BASH_REMATCH[2]%%[!0]*}"}"
    MNIST_ITEMS="${train_items:-0},${test_items:-0}"
    MNIST_ITEMS_JSON="{\"t10k\": ${test_items:-0}, \"train\": ${train_items:-0}}"
else
    usage_error "--mnist-items expects TRAIN,TEST (e.g. 60000,10000) or 'any', got '$MNIST_ITEMS'"
fi

[[ ${#REQUESTED[@]} -gt 0 ]] || REQUESTED=("${ALL_DATASETS[@]}")
for name in "${REQUESTED[@]}"; do
    valid=0
    for known in "${ALL_DATASETS[@]}"; do
        if [[ "$name" == "$known" ]]; then valid=1; fi
    done
    [[ $valid == 1 ]] || usage_error "unknown dataset '$name'; valid names: ${ALL_DATASETS[*]}"
done

MIRROR_IS_URL=0
if [[ -n "$MIRROR" ]]; then
    if [[ "$MIRROR" =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]]; then
        MIRROR_IS_URL=1
        MIRROR="${MIRROR%/}"
    else
        [[ -d "$MIRROR" ]] || die "mirror folder '$MIRROR' does not exist"
        MIRROR="$(cd "$MIRROR" && pwd)"
    fi
fi

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3
    elif command -v python >/dev/null 2>&1; then PYTHON=python
    else die "no python3 found (set PYTHON=/path/to/python)"
    fi
fi
[[ -f "$PREPARE" ]] || die "$PREPARE is missing (run getdata.sh from a full checkout)"
SUMS_ARGS=()
if [[ -n "$SUMS" ]]; then
    [[ -f "$SUMS" ]] || die "checksum file '$SUMS' does not exist"
    SUMS_ARGS=(--sums "$(cd "$(dirname "$SUMS")" && pwd)/$(basename "$SUMS")")
fi
prepare() { "$PYTHON" "$PREPARE" "${SUMS_ARGS[@]+"${SUMS_ARGS[@]}"}" "$@"; }

mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
CACHE="$DEST/.downloads"

# ---------------------------------------------------------------------------------------------
# Fetching: cache, then mirror, then the original URLs. Sets ARCHIVE to the local path.

CURRENT_PART=""
cleanup() { if [[ -n "$CURRENT_PART" ]]; then rm -f "$CURRENT_PART"; fi; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# download URL OUT: fetch into OUT.part, return non-zero on failure (OUT untouched).
download() {
    local url="$1" out="$2"
    local part="$out.part"
    CURRENT_PART="$part"
    rm -f "$part"
    say "downloading $url"
    local ok=0
    if command -v curl >/dev/null 2>&1; then
        local progress=(-sS)
        [[ -t 2 ]] && progress=(--progress-bar)
        curl -fL --retry 3 --connect-timeout 30 "${progress[@]}" -o "$part" "$url" || ok=$?
    elif command -v wget >/dev/null 2>&1; then
        local progress=(-nv)
        [[ -t 2 ]] && progress=()
        wget --tries=3 --timeout=30 "${progress[@]}" -O "$part" "$url" || ok=$?
    else
        die "neither curl nor wget is installed; install one, or put the archives in a" \
            "folder and use --mirror DIR"
    fi
    if [[ $ok -ne 0 ]]; then
        rm -f "$part"; CURRENT_PART=""
        say "download of $url failed (exit code $ok)"
        return 1
    fi
    if ! prepare verify "$part" --name "$(basename "$out")"; then
        rm -f "$part"; CURRENT_PART=""
        say "download of $url is damaged"
        return 1
    fi
    mv -f "$part" "$out"
    CURRENT_PART=""
}

# fetch FILE URL...: set ARCHIVE to a complete local copy of FILE.
fetch() {
    local file="$1"; shift
    local cached="$CACHE/$file"
    if [[ -f "$cached" ]]; then
        say "using cached $cached"
        ARCHIVE="$cached"
        return
    fi
    if [[ -n "$MIRROR" && $MIRROR_IS_URL == 0 ]]; then
        [[ -f "$MIRROR/$file" ]] || die "$file is missing from the mirror folder $MIRROR"
        say "using mirror $MIRROR/$file"
        ARCHIVE="$MIRROR/$file"
        return
    fi
    local urls=("$@")
    [[ -n "$MIRROR" ]] && urls=("$MIRROR/$file")
    mkdir -p "$CACHE"
    local url
    for url in "${urls[@]}"; do
        if download "$url" "$cached"; then
            ARCHIVE="$cached"
            return
        fi
    done
    if [[ -n "$MIRROR" ]]; then
        die "could not download $file from the mirror (${urls[*]})"
    fi
    die "could not download $file (tried ${urls[*]}); on a machine without internet," \
        "copy the archives into a folder and use --mirror DIR (or AWD_DATA_MIRROR=DIR)"
}

# ---------------------------------------------------------------------------------------------
# Datasets

# params_of NAME: the parameters recorded in DEST/NAME/.complete (JSON).
params_of() {
    case "$1" in
        enwik8) echo "{\"test_bytes\": $ENWIK8_TEST_BYTES}" ;;
        mnist) echo "{\"items\": $MNIST_ITEMS_JSON}" ;;
        toy) echo '{"lines": 4000, "seed": 0}' ;;
        *) echo "{}" ;;
    esac
}

# done_already NAME: true (and says so) when DEST/NAME is complete and not --force.
done_already() {
    local name="$1"
    if [[ $FORCE == 0 ]] && prepare check "$DEST/$name" --params "$(params_of "$name")"; then
        say "$name: already prepared in $DEST/$name, skipping (use --force to redo)"
        return 0
    fi
    return 1
}

get_ptb() {  # penn or pennchar, both from simple-examples.tgz
    local name="$1" infix=""
    [[ "$name" == pennchar ]] && infix="char."
    if done_already "$name"; then return 0; fi
    say "$name: preparing"
    fetch simple-examples.tgz "$PTB_URL"
    prepare extract "$ARCHIVE" "$DEST/$name" \
        "simple-examples/data/ptb.${infix}train.txt=train.txt" \
        "simple-examples/data/ptb.${infix}valid.txt=valid.txt" \
        "simple-examples/data/ptb.${infix}test.txt=test.txt"
}

get_wikitext() {  # wikitext-2 or wikitext-103
    local name="$1"
    if done_already "$name"; then return 0; fi
    say "$name: preparing"
    fetch "$name-v1.zip" "$WIKITEXT_URL/$name-v1.zip"
    prepare extract "$ARCHIVE" "$DEST/$name" \
        "$name/wiki.train.tokens=train.txt" \
        "$name/wiki.valid.tokens=valid.txt" \
        "$name/wiki.test.tokens=test.txt"
}

get_enwik8() {
    if done_already enwik8; then return 0; fi
    say "enwik8: preparing (the split of the full file takes a few seconds)"
    fetch enwik8.zip "$ENWIK8_URL"
    prepare enwik8 "$ARCHIVE" "$DEST/enwik8" --test-bytes "$ENWIK8_TEST_BYTES"
}

get_mnist() {
    if done_already mnist; then return 0; fi
    say "mnist: preparing"
    local file base sources=()
    for file in "${MNIST_FILES[@]}"; do
        local urls=()
        for base in "${MNIST_URLS[@]}"; do urls+=("$base/$file"); done
        fetch "$file" "${urls[@]}"
        sources+=("$ARCHIVE")
    done
    prepare mnist "$DEST/mnist" "${sources[@]}" --items "$MNIST_ITEMS"
}

get_toy() {
    if done_already toy; then return 0; fi
    say "toy: generating"
    prepare toy "$DEST/toy" --lines 4000 --seed 0
}

# A dataset complete with other parameters is never replaced unasked: with any such conflict the
# run stops before anything is touched (prepare check names the settings), unless --force.
if [[ $FORCE == 0 ]]; then
    conflict=0
    for name in "${REQUESTED[@]}"; do
        rc=0
        prepare check "$DEST/$name" --params "$(params_of "$name")" || rc=$?
        [[ $rc != 3 ]] || conflict=1
    done
    [[ $conflict == 0 ]] || exit 1
fi

for name in "${REQUESTED[@]}"; do
    case "$name" in
        toy) get_toy ;;
        penn|pennchar) get_ptb "$name" ;;
        wikitext-2|wikitext-103) get_wikitext "$name" ;;
        enwik8) get_enwik8 ;;
        mnist) get_mnist ;;
    esac
done
say "done: ${REQUESTED[*]} in $DEST"
