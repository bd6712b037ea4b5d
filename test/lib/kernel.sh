# shellcheck shell=bash
# The kernel the VM tests boot: Debian's, from the host's /boot. Sourced by test/vm/run.sh and
# test/systemd/run.sh, which define die and cache (a directory of their own for the extracted
# kernel) before calling these.
# shellcheck disable=SC2154 # cache and die are the caller's

# The newest kernel under /boot whose modules are installed.
find_kernel() {
	local v best=
	for v in /boot/vmlinuz-*; do
		[[ -e $v ]] || continue
		v=${v#/boot/vmlinuz-}
		[[ -d /lib/modules/$v/kernel ]] || continue
		if [[ -z $best ]] || [[ $(printf '%s\n%s\n' "$best" "$v" | sort -V | tail -n1) == "$v" ]]; then
			best=$v
		fi
	done
	[[ -n $best ]] || die "no /boot/vmlinuz-* with matching /lib/modules (is linux-image-amd64 installed?)"
	echo "$best"
}

# Debian's bzImage is xz-compressed, and decompressing it under TCG takes seconds on every boot.
# Its uncompressed ELF vmlinux carries a PVH entry note (CONFIG_PVH), which qemu boots directly,
# skipping the BIOS, real-mode setup and decompression: about 7 s faster per boot. Echoes the
# kernel image to boot: the cached vmlinux, or the bzImage when extraction is not possible.
boot_kernel() {
	local kver=$1 img=/boot/vmlinuz-$1 out key magic off tool
	key=$(stat -c '%s-%Y' "$img")
	out="$cache/vmlinux-$kver-$key"
	if [[ ! -f $out ]] && grep -q '^CONFIG_PVH=y' "/boot/config-$kver" 2>/dev/null; then
		rm -f "$cache"/vmlinux-*
		# The compressed payload starts at its format's magic; try each occurrence until one
		# decompresses to an ELF file.
		for magic in '\xfd\x37\x7a\x58\x5a\x00:xz' '\x1f\x8b\x08:gzip' '\x28\xb5\x2f\xfd:zstd'; do
			tool=${magic##*:}
			command -v "$tool" >/dev/null || continue
			for off in $(LC_ALL=C grep -aboP "${magic%:*}" "$img" | cut -d: -f1 | head -n 5); do
				tail -c +$((off + 1)) "$img" | "$tool" -dc 2>/dev/null >"$out.$$.tmp" || true
				if [[ $(head -c 4 "$out.$$.tmp" | od -An -c | tr -d ' ') == '177ELF' ]]; then
					mv "$out.$$.tmp" "$out"
					break 2
				fi
			done
		done
		rm -f "$out.$$.tmp"
	fi
	if [[ -f $out ]]; then echo "$out"; else echo "$img"; fi
}
