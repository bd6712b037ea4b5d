#!/bin/bash
# timeout: 240
# Captures volume/lvm/testdata: lvs and vgs exactly as the driver runs them.
. "$(dirname "$0")/lib.sh"
F=lv_name,lv_uuid,lv_size,lv_attr,lv_path,lv_tags,lv_time,origin,origin_size,lv_merging,snap_percent,data_percent,pool_lv,segtype,stripes,stripe_size
lvsj() { lvs -a --reportformat json --units b --nosuffix -o "$F" vg0; }
vgsj() { vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free,vg_extent_size,pv_count vg0; }
vgtagsj() { vgs --reportformat json -o vg_name,vg_tags,pv_name vg0; }

pvcreate -y /dev/ram0 /dev/ram1 /dev/ram2
vgcreate vg0 /dev/ram0 /dev/ram1 /dev/ram2
capture lvs-empty.json lvsj
capture vgs-tags-none.json vgtagsj
# The servers and crash epoch as the driver records them (one vgchange adds and removes), beside
# another tag; then what lvnbd never writes: two epochs and a run tag that does not parse.
vgchange --addtag lvnbd-epoch-3fa2b1c9 --addtag backup --addtag lvnbd-run-0123456789abcdef0123456789abcdef-4242-12345 vg0
vgchange --addtag lvnbd-epoch-00112233 --deltag lvnbd-epoch-3fa2b1c9 \
	--addtag lvnbd-run-fedcba9876543210fedcba9876543210-77-999 vg0
capture vgs-tags.json vgtagsj
vgchange --addtag lvnbd-epoch-44556677 --addtag lvnbd-run-garbage vg0
capture vgs-tags-odd.json vgtagsj
vgchange --deltag lvnbd-epoch-44556677 --deltag lvnbd-epoch-00112233 --deltag lvnbd-run-garbage --deltag backup \
	--deltag lvnbd-run-0123456789abcdef0123456789abcdef-4242-12345 \
	--deltag lvnbd-run-fedcba9876543210fedcba9876543210-77-999 vg0
# A striped LV of two segments, an untagged LV between them, a linear LV.
lvcreate --yes -n vm1 -L 64m -i 2 -I 64k --addtag lvnbd vg0
lvcreate --yes -n root -L 8m vg0
lvextend -L 128m vg0/vm1
lvcreate --yes -n lin -L 32m --addtag lvnbd vg0
lvcreate --yes -L 16m -T vg0/pool
lvcreate --yes -n thin1 -V 64m -T vg0/pool --addtag lvnbd
lvcreate --yes -s -p r -kn -n thin1+t1 --addtag lvnbd vg0/thin1
lvcreate --yes -s -p r -L 8m -n vm1+s1 --addtag lvnbd vg0/vm1
lvcreate --yes -s -p r -L 8m -n vm1+s2 --addtag lvnbd vg0/vm1
lvcreate --yes -s -p r -L 4m -n lin+full --addtag lvnbd vg0/lin
lvcreate --yes -s -L 8m -n manual vg0/lin
dd if=/dev/urandom of=/dev/vg0/vm1 bs=1M count=1 oflag=direct status=none
dd if=/dev/urandom of=/dev/vg0/lin bs=1M count=8 oflag=direct status=none
capture lvs.json lvsj
capture vgs.json vgsj
exec 3</dev/vg0/vm1 4</dev/vg0/thin1
lvconvert --merge vg0/vm1+s1
lvconvert --merge vg0/thin1+t1
capture lvs-merging.json lvsj
exec 3<&- 4<&-
lvcreate --yes -n filler -l 100%FREE vg0
capture vgs-full.json vgsj
vgremove -ff -y vg0
