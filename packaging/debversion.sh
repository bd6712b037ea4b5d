# shellcheck shell=sh
# Sourced by deb.sh (and its test). Needs a git() function or command that
# runs in the repository, for the commit count of an untagged build.

# debversion DESCRIBE: the Debian version of a git describe string.
debversion() {
	v=${1#v}
	dirty=
	case $v in *-dirty)
		v=${v%-dirty}
		dirty=.dirty
		;;
	esac
	if printf '%s\n' "$v" | grep -Eq -- '-[0-9]+-g[0-9a-f]+$'; then
		sha=${v##*-g}
		rest=${v%-g*}
		n=${rest##*-}
		base=${rest%-*}
		v=$(printf '%s' "$base" | tr - '~')+git$n.$sha
	elif printf '%s\n' "$v" | grep -Eq '^[0-9a-f]{7,40}$' && ! printf '%s\n' "$v" | grep -Eq '^[0-9]+$'; then
		n=$(git rev-list --count HEAD 2>/dev/null || true)
		v=0.0.0+git${n:+$n.}$v
	else
		v=$(printf '%s' "$v" | tr - '~')
	fi
	v=$v$dirty
	if ! printf '%s\n' "$v" | grep -Eq '^[0-9][A-Za-z0-9.+~]*$'; then
		echo "deb.sh: cannot make a Debian version of \"$1\" (got \"$v\"); give VERSION like 1.2.0" >&2
		return 1
	fi
	printf '%s\n' "$v"
}
