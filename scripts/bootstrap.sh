# Sourced by ./run-hub and ./run-tests: installs what they need, idempotently.
# Debian packages with apt-get when missing (as root, or through sudo), and the
# Python packages into .venv beside this checkout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CALLHOMEHUB_VENV:-$ROOT/.venv}"

apt_install() {  # apt_install PACKAGE:COMMAND ...
    local missing=()
    for spec in "$@"; do
        local pkg="${spec%%:*}" cmd="${spec#*:}"
        command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
    echo "bootstrap: apt-get update" >&2
    $sudo apt-get update -qq
    # One line per package as apt sets it up, instead of minutes of silence.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
        "${missing[@]}" 2>&1 | progress "^Setting up " "apt: "
}

progress() {  # progress PATTERN PREFIX: pass on the lines matching PATTERN, prefixed
    local line
    while IFS= read -r line; do
        case "$line" in E:*|ERROR:*|error:*) echo "bootstrap: $2$line" >&2 ;; esac
        [[ "$line" =~ $1 ]] && echo "bootstrap: $2$line" >&2
    done
    return 0
}

python_env() {  # python_env EXTRAS
    local extras="$1" stamp="$VENV/.installed-$1"
    if [ ! -x "$VENV/bin/python" ]; then
        if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            apt_install python3-venv:/nonexistent
            python3 -m venv "$VENV"
        fi
    fi
    # setup.py and the C sources too: `pip install -e` builds hub/*/_*.c in place.
    local newer=""
    [ -f "$stamp" ] && newer=$(find "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/hub" \
        \( -name pyproject.toml -o -name setup.py -o -name '*.c' \) -newer "$stamp" -print -quit)
    if [ ! -f "$stamp" ] || [ -n "$newer" ]; then
        echo "bootstrap: installing Python packages into $VENV" >&2
        # OpenSSL's headers for hub/ssh/_packets.c (setup.py builds without it, slower).
        [ -f /usr/include/openssl/evp.h ] || apt_install libssl-dev:/nonexistent
        # The C extensions are built in place and optional: one that fails to build
        # must not leave an older build of it behind to be imported.
        find "$ROOT/hub" -name '_*.so' -delete
        "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
        if ! "$VENV/bin/pip" install --disable-pip-version-check -e "$ROOT$extras" \
                > >(tee "$VENV/pip.log" | progress "^(Collecting|Successfully installed) " "pip: ") 2>&1; then
            cat "$VENV/pip.log" >&2
            exit 1
        fi
        # twistd finds twisted/plugins/callhomehub.py through sys.path entries.
        "$VENV/bin/python" -c "import site, sys; open(site.getsitepackages()[0] + '/callhomehub-plugins.pth', 'w').write(sys.argv[1] + '\\n')" "$ROOT"
        "$VENV/bin/python" -c "import hub, twisted.conch, bcrypt"
        touch "$stamp"
    fi
    web_assets
}

web_assets() {  # xterm.js from npm (web/package-lock.json) into hub/web/static/vendor/xterm/
    local web="$ROOT/web" vendor="$ROOT/hub/web/static/vendor/xterm"
    local mods="$ROOT/web/node_modules/@xterm"
    if [ -f "$vendor/xterm.js" ] && [ "$vendor/xterm.js" -nt "$web/package-lock.json" ]; then
        return 0
    fi
    apt_install npm:npm
    echo "bootstrap: installing xterm.js from npm into hub/web/static/vendor/xterm" >&2
    if ! (cd "$web" && npm ci --no-audit --no-fund --ignore-scripts) \
            > >(tee "$web/npm.log" | progress "^added " "npm: ") 2>&1; then
        cat "$web/npm.log" >&2
        exit 1
    fi
    rm -rf "$vendor"
    mkdir -p "$vendor"
    cp "$mods/xterm/lib/xterm.js" "$mods/xterm/css/xterm.css" "$mods/addon-fit/lib/addon-fit.js" \
        "$vendor/"
    cp "$mods/xterm/LICENSE" "$vendor/LICENSE.xterm"
    cp "$mods/addon-fit/LICENSE" "$vendor/LICENSE.addon-fit"
}
