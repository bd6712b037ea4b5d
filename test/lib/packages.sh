# shellcheck shell=bash
# Installs the Debian packages a test runner needs. Sourced by test/vm/run.sh and
# test/systemd/run.sh, which define PACKAGES, log_step and die before calling it.
# shellcheck disable=SC2154 # PACKAGES is the caller's

# install_packages installs whichever of PACKAGES are missing (as root, or through sudo -n).
install_packages() {
	local missing=() p
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	log_step "installing ${missing[*]}"
	local sudo=()
	if ((EUID != 0)); then
		command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
		sudo=(sudo -n)
	fi
	# Lock timeout: wait for another apt/dpkg run (unattended-upgrades, a parallel job) instead of
	# failing on the lock.
	local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
	"${apt[@]}" update -qq </dev/null
	"${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" </dev/null
}
