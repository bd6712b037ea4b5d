package guest

import (
	"errors"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseSuperView(t *testing.T) {
	view := func(role, state string) string {
		return "   Device Role : " + role + "\n   Array State : " + state + " ('A' == active, '.' == missing, 'R' == replacing)\n"
	}
	tests := []struct {
		name  string
		in    string
		want  SuperView
		alone bool
		err   bool
	}{
		{name: "stale leg", in: string(readTestdata(t, "examine-stale.txt")), want: SuperView{0, "AA"}},
		{name: "leg that ran alone", in: string(readTestdata(t, "examine-alone.txt")), want: SuperView{1, ".A"}, alone: true},
		{name: "second slot alone", in: view("Active device 1", ".A"), want: SuperView{1, ".A"}, alone: true},
		{name: "itself missing", in: view("Active device 1", "A."), want: SuperView{1, "A."}},
		{name: "replacing alone", in: view("Replacement device 0", "R."), want: SuperView{0, "R."}, alone: true},
		{name: "spare", in: view("spare", "A."), want: SuperView{-1, "A."}},
		{name: "journal", in: view("Journal", "AA"), want: SuperView{-1, "AA"}},
		{name: "inconsistent", in: view("Active device 0", "A?"), want: SuperView{0, "A?"}},
		{name: "role out of range", in: view("Active device 2", "A."), want: SuperView{2, "A."}},
		{name: "0.90 superblock", in: "      Number   Major   Minor   RaidDevice State\nthis     0      43        0        0      active sync   /dev/nbd0\n", err: true},
		{name: "empty", in: "", err: true},
		{name: "no role", in: "   Array State : AA ('A' == active, '.' == missing, 'R' == replacing)\n", err: true},
		{name: "no state", in: "   Device Role : Active device 0\n", err: true},
		{name: "bad role", in: view("Active device x", "AA"), err: true},
		{name: "negative role", in: view("Active device -1", "AA"), err: true},
		{name: "unknown role", in: view("Passive device 0", "AA"), err: true},
		{name: "bad state", in: view("Active device 0", "AX"), err: true},
		{name: "no legend", in: "   Device Role : Active device 0\n   Array State : AA\n", err: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSuperView([]byte(tt.in))
			if tt.err {
				if !errors.Is(err, errSyntax) {
					t.Errorf("ParseSuperView = %+v, %v; want a syntax error", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
			if got.RanAlone() != tt.alone {
				t.Errorf("RanAlone() = %v, want %v", got.RanAlone(), tt.alone)
			}
		})
	}
}

func FuzzParseSuperView(f *testing.F) {
	f.Add(readTestdata(f, "examine-stale.txt"))
	f.Add(readTestdata(f, "examine-alone.txt"))
	f.Add([]byte("   Device Role : spare\n   Array State : .A ('A' == active, '.' == missing, 'R' == replacing)\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := ParseSuperView(b)
		if err != nil {
			return
		}
		v.RanAlone() // must not panic, whatever the role
		role := "spare"
		if v.Role >= 0 {
			role = fmt.Sprintf("Active device %d", v.Role)
		}
		again, err := ParseSuperView(fmt.Appendf(nil, "   Device Role : %s\n   Array State : %s ('A' == active, '.' == missing, 'R' == replacing)\n", role, v.ArrayState))
		if err != nil || again != v {
			t.Errorf("round trip of %+v: %+v, %v", v, again, err)
		}
	})
}
