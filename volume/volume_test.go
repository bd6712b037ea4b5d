package volume

import "testing"

func TestSplitRollbacks(t *testing.T) {
	uuid := "hq8gg9-9iyh-kGL4-ARhw-cQ0h-Msl8-EfZ81I"
	for _, tc := range []struct {
		id, base string
		n        int
	}{
		{uuid, uuid, 0},
		{uuid + "-r1", uuid, 1},
		{uuid + "-r12", uuid, 12},
		{"18eeea2fb604df13-r3", "18eeea2fb604df13", 3},
		{uuid + "-r0", uuid + "-r0", 0},
		{uuid + "-r01", uuid + "-r01", 0},
		{uuid + "-r", uuid + "-r", 0},
		{uuid + "-r-1", uuid + "-r-1", 0},
		{uuid + "-rx", uuid + "-rx", 0},
		{"-r1", "-r1", 0},
		{"", "", 0},
	} {
		base, n := SplitRollbacks(tc.id)
		if base != tc.base || n != tc.n {
			t.Errorf("SplitRollbacks(%q) = %q, %d; want %q, %d", tc.id, base, n, tc.base, tc.n)
		}
	}
}

func FuzzSplitRollbacks(f *testing.F) {
	f.Add("hq8gg9-9iyh-kGL4-ARhw-cQ0h-Msl8-EfZ81I-r2")
	f.Add("x-r+1")
	f.Fuzz(func(t *testing.T, id string) {
		base, n := SplitRollbacks(id)
		if n == 0 && base != id {
			t.Fatalf("SplitRollbacks(%q) = %q, 0", id, base)
		}
		if n > 0 && RolledBackID(base, n) != id {
			t.Fatalf("SplitRollbacks(%q) = %q, %d, which makes %q", id, base, n, RolledBackID(base, n))
		}
	})
}
