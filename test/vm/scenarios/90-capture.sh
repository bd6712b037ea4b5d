#!/bin/bash
# timeout: 180
# LVM reports every kind of LV the driver meets as it expects (linear, striped, multi-segment,
# classic snapshot in use and invalidated, thin pool, thin volume and thin snapshot), and prints
# the reports with capture (run.sh --capture DIR saves them). The parser tests' own data comes
# from volume/lvm/testdata/vm-capture.sh, with the driver's exact command lines.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

LV_FIELDS=lv_name,vg_name,lv_size,stripes,stripe_size,lv_attr,origin,snap_percent,data_percent,pool_lv,segtype
VG_FIELDS=vg_name,vg_size,vg_free,pv_count

lvs_json() { lvs --reportformat json --units b --nosuffix -o "$LV_FIELDS" "$@"; }
vgs_json() { vgs --reportformat json --units b --nosuffix -o "$VG_FIELDS" "$@"; }

# capture_failing NAME CMD...: capture a command expected to fail as NAME.stdout and
# NAME.stderr, the latter ending with an "exit status: N" line.
capture_failing() {
	local name=$1 rc=0
	shift
	{ set +x; } 2>/dev/null # keep the trace out of the captured stderr
	"$@" >"$name.stdout" 2>"$name.stderr" || rc=$?
	set -x
	echo "exit status: $rc" >>"$name.stderr"
	capture "$name.stdout" cat "$name.stdout"
	capture "$name.stderr" cat "$name.stderr"
}

capture lvm-version.txt lvm version

pvcreate -y /dev/ram0 /dev/ram1
vgcreate vg0 /dev/ram0 /dev/ram1
capture lvs-empty-vg.json lvs_json vg0
capture_failing lvs-missing-vg lvs_json nosuchvg

# Linear and striped volumes, and one of two segments (linear, then grown with 2 stripes).
lvcreate -y -n lin -L 32m vg0
lvcreate -y -n str -i 2 -I 64k -L 64m vg0
lvcreate -y -n grown -L 8m vg0 /dev/ram0
lvextend -i 2 -I 64k -L 24m vg0/grown

# A classic snapshot with some COW in use.
lvcreate -y -s -n lin_snap -L 8m vg0/lin
dd if=/dev/urandom of=/dev/vg0/lin bs=1M count=1 oflag=direct status=none

# A classic snapshot overfilled: a 4 MiB COW and 16 MiB written to its origin invalidate it.
lvcreate -y -s -n str_snap -L 4m vg0/str
dd if=/dev/urandom of=/dev/vg0/str bs=1M count=16 oflag=direct status=none
wait_for "[[ \$(lvs --noheadings -o lv_attr vg0/str_snap | tr -d ' ') == ????I* ]]" 10

# A thin pool, a thin volume with data, and a thin snapshot of it.
lvcreate -y -n pool -L 64m --type thin-pool vg0
lvcreate -y -n thin1 -V 128m --thinpool vg0/pool
dd if=/dev/urandom of=/dev/vg0/thin1 bs=1M count=8 oflag=direct status=none
lvcreate -y -s -n thin1_snap vg0/thin1

capture lvs.json lvs_json vg0
capture lvs-all.json lvs_json -a vg0
capture lvs-snapshots.json lvs_json -S 'origin!=""' vg0
capture vgs.json vgs_json
capture vgs-vg0.json vgs_json vg0
capture pvs.json pvs --reportformat json --units b --nosuffix -o pv_name,vg_name,pv_size,pv_free

report=$(lvs_json vg0)
echo "$report"
# One row per segment: grown appears twice, once linear and once striped.
assert_eq 2 "$(grep -c '"lv_name":"grown"' <<<"$report")" "rows for the 2-segment LV"
grep -q '"lv_name":"str", [^}]*"stripes":"2"' <<<"$report" || fail "str is not striped"
grep -q '"lv_name":"str_snap", [^}]*"lv_attr":"swi-I-s---"' <<<"$report" || fail "str_snap is not invalid"
grep -q '"lv_name":"lin_snap", [^}]*"origin":"lin"' <<<"$report" || fail "lin_snap has no origin"
grep -q '"lv_name":"thin1_snap", [^}]*"pool_lv":"pool"' <<<"$report" || fail "thin1_snap not in pool"

vgremove -y vg0
pvremove -y /dev/ram0 /dev/ram1
