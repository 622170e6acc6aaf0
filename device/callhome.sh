#!/bin/sh
# callhome.sh - keep a device behind NAT connected to a callhomehub hub.
#
# POSIX sh (dash, busybox ash); needs only the OpenSSH client (ssh, ssh-keygen)
# and the usual small tools (date, od, mktemp, grep, tail, dirname, uname).
# Generates the device key, registers it once with the Call Home Password,
# authorizes the hub's management key, then keeps `ssh -N -R ... cms@hub` up
# with exponential back-off.  See device/README.md and docs/device-setup.md.

set -u
set -f    # FORWARDS and SSH_OPTS are split into words on purpose; never globbed

PROG=callhome
SETTINGS=" HUB HUB_PORT NODE REGISTRAR KEY STATE FORWARDS NSCA NSCA_LOCAL_PORT"
SETTINGS="$SETTINGS AUTHORIZED_KEYS MGMT_KEY_OPTIONS KNOWN_HOSTS HUB_HOST_KEY"
SETTINGS="$SETTINGS CALLHOME_PASSWORD_FILE BACKOFF_MAX BACKOFF_RESET SSH_OPTS "

usage() {
	cat <<EOF
usage: callhome.sh [-c FILE] [-s] [-1 | -r]

Keeps an SSH connection from this device to a callhomehub hub up, so that
the hub can reach the device's services through reverse forwards.

  -c FILE  settings file (default /etc/callhome.conf; NAME=value lines)
  -s       log to syslog (logger, ssh -y) instead of stderr
  -1       make one connection only and exit with ssh's status
  -r       register (again) only: upload the key, install the hub's
           management key, exit
  -h       this help

Settings (config file or environment; the environment wins):
  HUB                     hub host name or address (required)
  HUB_PORT=22             hub SSH port
  NODE=\$(uname -n)        node name to register as
  REGISTRAR=cms           the hub's registrar user
  STATE=/etc/callhome     private state directory (0700)
  KEY=STATE/id_ed25519    device key, generated when missing
  FORWARDS='-R 0:localhost:22'   reverse forwards (e.g. add -R http:0:localhost:80)
  NSCA=yes  NSCA_LOCAL_PORT=5667  local forward to the hub's NSCA intake
  AUTHORIZED_KEYS=/root/.ssh/authorized_keys   where the hub's key goes ('' = nowhere)
  MGMT_KEY_OPTIONS=''     options prefixed to that key, e.g. from="127.0.0.1,::1"
  KNOWN_HOSTS=STATE/known_hosts  hub host key (trusted on first use)
  HUB_HOST_KEY=''         pin the hub host key instead ("ssh-ed25519 AAAA...")
  CALLHOME_PASSWORD_FILE  file holding the Call Home Password (or the
                          CALLHOME_PASSWORD environment variable); used only
                          to register
  BACKOFF_MAX=60          longest wait between reconnects, seconds
  BACKOFF_RESET=60        a connection up this long resets the back-off
  SSH_OPTS=''             extra ssh options, placed first (first value wins)

Exit status: 0 done or stopped by SIGTERM/SIGINT; 1 registration refused or
failed; 2 bad usage or settings; with -1, ssh's status.
EOF
}

# ---- logging --------------------------------------------------------------

SYSLOG=
log() {
	if [ -n "$SYSLOG" ]; then
		logger -t "$PROG" -p daemon.notice "$*"
	else
		printf '%s %s[%s]: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$PROG" "$$" "$*" >&2
	fi
}

die() {    # die STATUS MESSAGE
	status=$1
	shift
	log "$*"
	exit "$status"
}

# ---- settings -------------------------------------------------------------

# Remember which settings the environment gives, so that the file cannot
# override them.
FROM_ENV=" "
for name in $SETTINGS; do
	if eval "[ -n \"\${$name+set}\" ]"; then
		FROM_ENV="$FROM_ENV$name "
	fi
done

trim() {    # trim VALUE -> $trimmed
	trimmed=$1
	trimmed=${trimmed#"${trimmed%%[![:space:]]*}"}
	trimmed=${trimmed%"${trimmed##*[![:space:]]}"}
}

load_config() {    # load_config FILE
	file=$1
	lineno=0
	while IFS= read -r line || [ -n "$line" ]; do
		lineno=$((lineno + 1))
		trim "$line"
		line=$trimmed
		case $line in
			'' | '#'*) continue ;;
			*=*) ;;
			*) die 2 "$file:$lineno: expected NAME=value, got: $line" ;;
		esac
		trim "${line%%=*}"
		name=$trimmed
		trim "${line#*=}"
		value=$trimmed
		case $value in
			\"*\") value=${value#\"}; value=${value%\"} ;;
			\'*\') value=${value#\'}; value=${value%\'} ;;
		esac
		case $SETTINGS in
			*" $name "*) ;;
			*)
				case $name in
					CALLHOME_PASSWORD)
						die 2 "$file:$lineno: put the password in CALLHOME_PASSWORD_FILE, not in the settings file" ;;
				esac
				die 2 "$file:$lineno: unknown setting '$name'" ;;
		esac
		case $FROM_ENV in
			*" $name "*) ;;
			*) eval "$name=\$value" ;;
		esac
	done <"$file"
}

is_uint() {
	case $1 in
		'' | *[!0-9]*) return 1 ;;
	esac
	[ "${#1}" -le 9 ]
}

check_settings() {
	HUB=${HUB-}
	HUB_PORT=${HUB_PORT-22}
	NODE=${NODE-$(uname -n)}
	REGISTRAR=${REGISTRAR-cms}
	STATE=${STATE-/etc/callhome}
	KEY=${KEY-$STATE/id_ed25519}
	FORWARDS=${FORWARDS-"-R 0:localhost:22"}
	NSCA=${NSCA-yes}
	NSCA_LOCAL_PORT=${NSCA_LOCAL_PORT-5667}
	AUTHORIZED_KEYS=${AUTHORIZED_KEYS-/root/.ssh/authorized_keys}
	MGMT_KEY_OPTIONS=${MGMT_KEY_OPTIONS-}
	KNOWN_HOSTS=${KNOWN_HOSTS-$STATE/known_hosts}
	HUB_HOST_KEY=${HUB_HOST_KEY-}
	CALLHOME_PASSWORD_FILE=${CALLHOME_PASSWORD_FILE-}
	BACKOFF_MAX=${BACKOFF_MAX-60}
	BACKOFF_RESET=${BACKOFF_RESET-60}
	SSH_OPTS=${SSH_OPTS-}

	[ -n "$HUB" ] || die 2 "HUB is not set (the hub's host name or address); see -h"
	case $HUB in
		-* | *[[:space:]@]*) die 2 "HUB '$HUB' is not a host name or address" ;;
	esac
	if ! is_uint "$HUB_PORT" || [ "$HUB_PORT" -lt 1 ] || [ "$HUB_PORT" -gt 65535 ]; then
		die 2 "HUB_PORT '$HUB_PORT' is not a port number"
	fi
	case $NODE in
		'' | -* | *[!A-Za-z0-9._-]*)
			die 2 "NODE '$NODE' is not a node name (letters, digits, '.', '_', '-')" ;;
	esac
	[ "${#NODE}" -le 63 ] || die 2 "NODE '$NODE' is longer than 63 characters"
	case $REGISTRAR in
		'' | -* | *[!A-Za-z0-9._-]*) die 2 "REGISTRAR '$REGISTRAR' is not a user name" ;;
	esac
	case $NSCA in
		yes | on | true | 1) NSCA=yes ;;
		no | off | false | 0 | '') NSCA=no ;;
		*) die 2 "NSCA '$NSCA' is not yes or no" ;;
	esac
	if [ "$NSCA" = yes ]; then
		if ! is_uint "$NSCA_LOCAL_PORT" || [ "$NSCA_LOCAL_PORT" -lt 1 ] \
			|| [ "$NSCA_LOCAL_PORT" -gt 65535 ]; then
			die 2 "NSCA_LOCAL_PORT '$NSCA_LOCAL_PORT' is not a port number"
		fi
	fi
	if ! is_uint "$BACKOFF_MAX" || [ "$BACKOFF_MAX" -lt 1 ]; then
		die 2 "BACKOFF_MAX '$BACKOFF_MAX' is not a whole number of seconds >= 1"
	fi
	is_uint "$BACKOFF_RESET" || die 2 "BACKOFF_RESET '$BACKOFF_RESET' is not a whole number of seconds"
	[ -n "$STATE" ] || die 2 "STATE is empty"
	[ -n "$KEY" ] || die 2 "KEY is empty"
	[ -n "$KNOWN_HOSTS" ] || die 2 "KNOWN_HOSTS is empty"
	MARKER=$STATE/registered
	PIDFILE=$STATE/callhome.pid
}

# ---- child processes and signals ------------------------------------------

CHILD=
STOPPING=
TMPDIR_OWN=
OWN_PIDFILE=

cleanup() {
	if [ -n "$TMPDIR_OWN" ]; then
		rm -rf "$TMPDIR_OWN"
		TMPDIR_OWN=
	fi
	if [ -n "$OWN_PIDFILE" ] && [ -f "$PIDFILE" ] && [ "$(cat "$PIDFILE" 2>/dev/null)" = "$$" ]; then
		rm -f "$PIDFILE"
	fi
}

on_signal() {
	STOPPING=1
	if [ -n "$CHILD" ]; then
		kill -TERM "$CHILD" 2>/dev/null
	fi
}

trap cleanup EXIT
trap on_signal TERM INT HUP

stop_now() {
	log "stopping"
	exit 0
}

# Run "$@" in the background and wait for it, so that SIGTERM interrupts the
# wait (a foreground child would delay the trap until it exits).  The child's
# exit status ends up in $STATUS; a signal ends the script.
run_child() {
	"$@" &
	CHILD=$!
	if [ -n "$STOPPING" ]; then
		kill -TERM "$CHILD" 2>/dev/null
	fi
	wait "$CHILD"
	STATUS=$?
	if [ -n "$STOPPING" ]; then
		wait "$CHILD" 2>/dev/null
		CHILD=
		stop_now
	fi
	CHILD=
}

pause() {    # pause SECONDS, interruptible by SIGTERM
	run_child sleep "$1"
}

now() {
	date +%s
}

# A random number in 0..65535 without $RANDOM (not in POSIX sh).
random16() {
	trim "$(od -An -N2 -tu2 /dev/urandom 2>/dev/null)"
	if is_uint "$trimmed"; then
		echo "$trimmed"
	else
		echo "$$"
	fi
}

# ---- key, host key, authorized_keys ---------------------------------------

ensure_key() {
	umask 077
	mkdir -p "$STATE" || die 2 "cannot create STATE directory $STATE"
	chmod 700 "$STATE"
	keydir=$(dirname "$KEY")
	[ -d "$keydir" ] || mkdir -p "$keydir" || die 2 "cannot create $keydir"
	if [ ! -f "$KEY" ]; then
		log "generating the device key $KEY"
		ssh-keygen -q -t ed25519 -N '' -C "callhome@$NODE" -f "$KEY" </dev/null >/dev/null \
			|| die 2 "ssh-keygen could not create $KEY"
	fi
	chmod 600 "$KEY"
	if [ ! -s "$KEY.pub" ]; then
		ssh-keygen -y -f "$KEY" >"$KEY.pub" || die 2 "cannot derive $KEY.pub from $KEY"
	fi
}

# Sets HOSTKEY_OPTS: trust on first use, or only the pinned key.
prepare_known_hosts() {
	# ssh reads a space in UserKnownHostsFile as a second file name.
	case $KNOWN_HOSTS in
		*[[:space:]]*) die 2 "KNOWN_HOSTS '$KNOWN_HOSTS' must not contain spaces" ;;
	esac
	if [ -n "$HUB_HOST_KEY" ]; then
		if [ "$HUB_PORT" = 22 ]; then
			pattern=$HUB
		else
			pattern="[$HUB]:$HUB_PORT"
		fi
		# shellcheck disable=SC2086 # split the key line into its fields
		set -- $HUB_HOST_KEY
		case ${1-} in
			ssh-* | ecdsa-* | sk-*) ;;
			*) [ $# -gt 0 ] && shift ;;    # a known_hosts line: drop its host field
		esac
		[ $# -ge 2 ] || die 2 "HUB_HOST_KEY is not a public key line ('ssh-ed25519 AAAA...')"
		line="$pattern $1 $2"
		if [ ! -f "$KNOWN_HOSTS" ] || [ "$(cat "$KNOWN_HOSTS")" != "$line" ]; then
			printf '%s\n' "$line" >"$KNOWN_HOSTS" || die 2 "cannot write $KNOWN_HOSTS"
		fi
		checking=yes
	else
		checking=accept-new
	fi
	HOSTKEY_OPTS="-o UserKnownHostsFile=$KNOWN_HOSTS -o GlobalKnownHostsFile=/dev/null"
	HOSTKEY_OPTS="$HOSTKEY_OPTS -o StrictHostKeyChecking=$checking"
}

install_mgmt_key() {    # install_mgmt_key "TYPE BLOB COMMENT"
	if [ -z "$AUTHORIZED_KEYS" ]; then
		log "AUTHORIZED_KEYS is empty: not installing the hub's management key"
		return 0
	fi
	# shellcheck disable=SC2086 # fields of the key line
	set -- $1
	line="$*"
	if [ -n "$MGMT_KEY_OPTIONS" ]; then
		line="$MGMT_KEY_OPTIONS $line"
	fi
	dir=$(dirname "$AUTHORIZED_KEYS")
	umask 077
	[ -d "$dir" ] || mkdir -p "$dir" || return 1
	if [ -f "$AUTHORIZED_KEYS" ] && grep -qF -- "$1 $2" "$AUTHORIZED_KEYS"; then
		log "the hub's management key is already in $AUTHORIZED_KEYS"
		return 0
	fi
	if [ -s "$AUTHORIZED_KEYS" ] && [ -n "$(tail -c 1 "$AUTHORIZED_KEYS")" ]; then
		echo >>"$AUTHORIZED_KEYS" || return 1
	fi
	printf '%s\n' "$line" >>"$AUTHORIZED_KEYS" || return 1
	log "installed the hub's management key in $AUTHORIZED_KEYS"
}

# ---- registration ---------------------------------------------------------

PASSWORD=${CALLHOME_PASSWORD-}
unset CALLHOME_PASSWORD    # never handed on to the long-lived ssh

read_password() {
	if [ -z "$PASSWORD" ] && [ -n "$CALLHOME_PASSWORD_FILE" ]; then
		[ -r "$CALLHOME_PASSWORD_FILE" ] \
			|| { log "cannot read CALLHOME_PASSWORD_FILE $CALLHOME_PASSWORD_FILE"; return 1; }
		IFS= read -r PASSWORD <"$CALLHOME_PASSWORD_FILE" || [ -n "$PASSWORD" ]
	fi
	[ -n "$PASSWORD" ] || {
		log "not registered yet and no Call Home Password:" \
			"set CALLHOME_PASSWORD or CALLHOME_PASSWORD_FILE"
		return 1
	}
}

reason_of() {    # reason_of FILE: its non-empty lines joined by "; "
	reason=
	while IFS= read -r l || [ -n "$l" ]; do
		trim "$l"
		[ -n "$trimmed" ] && reason="${reason:+$reason; }$trimmed"
	done <"$1"
	echo "${reason:-no reason given}"
}

# Runs in a background subshell (run_child): the password goes into the
# environment of this one ssh process only.
register_ssh() {    # register_ssh TMPDIR
	CALLHOME_ASKPASS_SECRET=$PASSWORD
	SSH_ASKPASS=$1/askpass
	SSH_ASKPASS_REQUIRE=force    # OpenSSH >= 8.4; older clients need DISPLAY and no tty
	DISPLAY=${DISPLAY:-:0}
	export CALLHOME_ASKPASS_SECRET SSH_ASKPASS SSH_ASKPASS_REQUIRE DISPLAY
	# shellcheck disable=SC2086 # SSH_OPTS and HOSTKEY_OPTS are word lists
	exec ssh -F /dev/null $SSH_OPTS -p "$HUB_PORT" $HOSTKEY_OPTS \
		-o PubkeyAuthentication=no -o PreferredAuthentications=password,keyboard-interactive \
		-o NumberOfPasswordPrompts=1 -o ConnectTimeout=30 -o LogLevel=ERROR \
		"$REGISTRAR@$HUB" register "$NODE" <"$KEY.pub" >"$1/out" 2>"$1/err"
}

# register: 0 registered; 1 refused (permanent: exit); 2 failed (may retry).
register() {
	read_password || return 1
	tmp=$(mktemp -d "$STATE/askpass.XXXXXX") || { log "cannot create a temporary directory in $STATE"; return 2; }
	TMPDIR_OWN=$tmp
	# The password reaches ssh through this helper and an environment variable
	# of ssh alone: never through a command line that ps would show.
	cat >"$tmp/askpass" <<'EOF'
#!/bin/sh
printf '%s\n' "$CALLHOME_ASKPASS_SECRET"
EOF
	chmod 700 "$tmp/askpass"
	had_hostkey=
	if [ -s "$KNOWN_HOSTS" ]; then
		had_hostkey=1
	fi
	log "registering as '$NODE' with $REGISTRAR@$HUB port $HUB_PORT"
	run_child register_ssh "$tmp"
	status=$STATUS
	if [ -z "$had_hostkey" ] && [ -s "$KNOWN_HOSTS" ]; then
		log "first contact: trusting the hub's host key $(ssh-keygen -l -f "$KNOWN_HOSTS" | head -n 1)"
	fi
	result=2
	if [ "$status" -eq 0 ]; then
		IFS= read -r mgmt <"$tmp/out" || [ -n "${mgmt-}" ]
		case ${mgmt-} in
			ssh-* | ecdsa-* | sk-*)
				if install_mgmt_key "$mgmt"; then
					echo "$HUB $HUB_PORT $NODE" >"$MARKER"
					log "registered as '$NODE' (pending until approved on the hub)"
					result=0
				else
					log "cannot write $AUTHORIZED_KEYS"
					result=1
				fi
				;;
			*)
				log "the hub accepted the key but sent no management key"
				result=1
				;;
		esac
	elif [ "$status" -eq 1 ]; then
		log "registration refused by the hub: $(reason_of "$tmp/err")"
		result=1
	else
		log "registration failed (ssh exit status $status): $(reason_of "$tmp/err")"
		if grep -qE 'Permission denied|Host key verification failed|IDENTIFICATION HAS CHANGED' "$tmp/err"; then
			result=1
		fi
	fi
	rm -rf "$tmp"
	TMPDIR_OWN=
	return $result
}

# ---- the tunnel -----------------------------------------------------------

# Start ssh in the background and wait for it; sets STATUS.
tunnel_once() {
	nsca_opts=
	if [ "$NSCA" = yes ]; then
		nsca_opts="-L $NSCA_LOCAL_PORT:localhost:5667"
	fi
	syslog_opt=
	if [ -n "$SYSLOG" ]; then
		syslog_opt=-y
	fi
	# shellcheck disable=SC2086 # option lists are split into words on purpose
	run_child ssh -F /dev/null $syslog_opt $SSH_OPTS -N \
		-o ExitOnForwardFailure=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=3 \
		-o BatchMode=yes -o IdentitiesOnly=yes -i "$KEY" \
		-o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
		-o ConnectTimeout=30 $HOSTKEY_OPTS -p "$HUB_PORT" \
		$FORWARDS $nsca_opts "$REGISTRAR@$HUB" </dev/null
}

# Sets DELAY from BACKOFF: between half of it and all of it ("equal jitter"),
# so that devices cut off by one hub restart do not all call back at once.
jittered() {
	half=$(((BACKOFF + 1) / 2))
	DELAY=$((half + $(random16) % (BACKOFF - half + 1)))
}

grow_backoff() {
	BACKOFF=$((BACKOFF * 2))
	if [ "$BACKOFF" -gt "$BACKOFF_MAX" ]; then
		BACKOFF=$BACKOFF_MAX
	fi
}

take_pidfile() {
	if [ -f "$PIDFILE" ]; then
		old=$(cat "$PIDFILE" 2>/dev/null)
		if is_uint "$old" && [ "$old" != "$$" ] && kill -0 "$old" 2>/dev/null; then
			# A recycled pid after a reboot is not us: check the command line where we can.
			if [ ! -r "/proc/$old/cmdline" ] || tr '\0' ' ' <"/proc/$old/cmdline" | grep -q callhome; then
				die 2 "already running as pid $old ($PIDFILE): two connections of one node would keep taking over from each other"
			fi
		fi
	fi
	echo "$$" >"$PIDFILE" || die 2 "cannot write $PIDFILE"
	OWN_PIDFILE=1
}

# ---- main -----------------------------------------------------------------

CONFIG=/etc/callhome.conf
CONFIG_GIVEN=
MODE=keep
while getopts c:s1rh opt; do
	case $opt in
		c) CONFIG=$OPTARG; CONFIG_GIVEN=1 ;;
		s) SYSLOG=1 ;;
		1) MODE=once ;;
		r) MODE=register ;;
		h) usage; exit 0 ;;
		*) echo "usage: callhome.sh [-c FILE] [-s] [-1 | -r]   (-h for help)" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
if [ $# -gt 0 ]; then
	echo "callhome.sh: unexpected argument '$1' (-h for help)" >&2
	exit 2
fi

if [ -f "$CONFIG" ]; then
	[ -r "$CONFIG" ] || die 2 "cannot read $CONFIG"
	load_config "$CONFIG"
elif [ -n "$CONFIG_GIVEN" ]; then
	die 2 "no settings file $CONFIG"
fi
check_settings
ensure_key
prepare_known_hosts

if [ "$MODE" = register ]; then
	register || exit 1
	exit 0
fi

take_pidfile
BACKOFF=1
if [ ! -f "$MARKER" ]; then
	while :; do
		register
		result=$?
		[ "$result" -eq 0 ] && break
		[ "$result" -eq 1 ] && exit 1
		[ "$MODE" = once ] && exit 1
		jittered
		log "retrying the registration in $DELAY s"
		pause "$DELAY"
		grow_backoff
	done
fi

BACKOFF=1
attempt=0
while :; do
	attempt=$((attempt + 1))
	log "connecting to $REGISTRAR@$HUB port $HUB_PORT as '$NODE' (connection $attempt)"
	started=$(now)
	tunnel_once
	up=$(($(now) - started))
	log "ssh exited with status $STATUS after $up s"
	if [ "$MODE" = once ]; then
		exit "$STATUS"
	fi
	if [ "$up" -ge "$BACKOFF_RESET" ]; then
		BACKOFF=1
	fi
	jittered
	log "reconnecting in $DELAY s"
	pause "$DELAY"
	grow_backoff
done
