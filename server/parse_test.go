package server

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseListenURL(t *testing.T) {
	tests := []struct {
		in      string
		want    ListenAddr
		wantErr bool
	}{
		{"tcp://127.0.0.1:10809", ListenAddr{"tcp", "127.0.0.1:10809"}, false},
		{"tcp://0.0.0.0:0", ListenAddr{"tcp", "0.0.0.0:0"}, false},
		{"tcp://[::1]:10809", ListenAddr{"tcp", "[::1]:10809"}, false},
		{"tcp://:10809", ListenAddr{"tcp", ":10809"}, false},
		{"tcp://host:10809/", ListenAddr{"tcp", "host:10809"}, false},
		{"unix:///run/lvnbd.sock", ListenAddr{"unix", "/run/lvnbd.sock"}, false},
		{"tcp://127.0.0.1", ListenAddr{}, true},
		{"tcp://127.0.0.1:99999", ListenAddr{}, true},
		{"tcp://127.0.0.1:port", ListenAddr{}, true},
		{"tcp://h:1/path", ListenAddr{}, true},
		{"unix://run/lvnbd.sock", ListenAddr{}, true},
		{"unix://", ListenAddr{}, true},
		{"unix:///run/a%3Fb%20c.sock", ListenAddr{"unix", "/run/a?b c.sock"}, false},
		{"uniX:/%00", ListenAddr{}, true},
		{"unix:///" + strings.Repeat("s", 106), ListenAddr{"unix", "/" + strings.Repeat("s", 106)}, false},
		{"unix:///" + strings.Repeat("s", 107), ListenAddr{}, true},
		{"unix:///run/x.sock?mode=600", ListenAddr{}, true},
		{"unix:///run/x.sock#x", ListenAddr{}, true},
		{"tcp://h:1?x", ListenAddr{}, true},
		{"tcp://h:1?", ListenAddr{}, true},
		{"tcp://user@h:1", ListenAddr{}, true},
		{"127.0.0.1:10809", ListenAddr{}, true},
		{"udp://127.0.0.1:1", ListenAddr{}, true},
		{"", ListenAddr{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseListenURL(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("error %v, want error: %v", err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
			if err == nil {
				// The canonical form parses back to the same address.
				again, err := ParseListenURL(got.String())
				if err != nil || again != got {
					t.Errorf("round trip of %q: %v %v", got.String(), again, err)
				}
			}
		})
	}
}

func FuzzParseListenURL(f *testing.F) {
	for _, s := range []string{"tcp://127.0.0.1:10809", "unix:///run/x.sock", "tcp://[::1]:1", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParseListenURL(s)
		if err != nil {
			return
		}
		b, err := ParseListenURL(a.String())
		if err != nil || a != b {
			t.Fatalf("%q parsed to %+v, which re-parses to %+v, %v", s, a, b, err)
		}
	})
}

func TestParseExportSpec(t *testing.T) {
	tests := []struct {
		in      string
		want    ExportSpec
		wantErr bool
	}{
		{"vm1=/dev/vg0/vm1", ExportSpec{"vm1", "/dev/vg0/vm1", false}, false},
		{"golden=/srv/golden.img:ro", ExportSpec{"golden", "/srv/golden.img", true}, false},
		{"vm1@snap=/dev/vg0/snap:ro", ExportSpec{"vm1@snap", "/dev/vg0/snap", true}, false},
		{"a=b=c", ExportSpec{"a", "b=c", false}, false},
		{"novalue", ExportSpec{}, true},
		{"=/x", ExportSpec{}, true},
		{"x=", ExportSpec{}, true},
		{"x=:ro", ExportSpec{}, true},
		{"-x=/y", ExportSpec{}, true},
		{".x=/y", ExportSpec{}, true},
		{"a b=/y", ExportSpec{}, true},
		{"x/y=/y", ExportSpec{}, true},
		{"vm1=/srv/vm1.img:rw", ExportSpec{}, true}, // read-write is the default; :rw would be taken for the path
		{"d=/dev/disk/by-path/pci-0000:00:1f.2-ata-1", ExportSpec{"d", "/dev/disk/by-path/pci-0000:00:1f.2-ata-1", false}, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseExportSpec(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("error %v, want error: %v", err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func FuzzParseExportSpec(f *testing.F) {
	for _, s := range []string{"vm1=/dev/vg0/vm1", "g=/x:ro", "=", "a=b=c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := ParseExportSpec(s)
		if err != nil {
			return
		}
		if ValidateExportName(spec.Name) != nil || spec.Path == "" {
			t.Fatalf("%q accepted as %+v", s, spec)
		}
		round := spec.Name + "=" + spec.Path
		if spec.ReadOnly {
			round += ":ro"
		}
		if again, err := ParseExportSpec(round); err != nil || again != spec {
			t.Fatalf("%q: %+v re-parses to %+v, %v", s, spec, again, err)
		}
	})
}
