package pair

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestValidateSpecs(t *testing.T) {
	with := func(f func(s *Spec)) []Spec {
		s := testSpec()
		f(&s)
		return []Spec{s}
	}
	other := Spec{Name: "vm2", URIs: [2]string{"nbd://192.0.2.2/vm2", "nbd://198.51.100.2/vm2"}, Connections: 1, Timeout: 30 * time.Second}
	tests := []struct {
		name  string
		specs []Spec
		want  []string // "key: message part", one per error
	}{
		{name: "valid", specs: []Spec{testSpec(), other}},
		{name: "valid with xen", specs: []Spec{xenSpec()}},
		{name: "no name", specs: with(func(s *Spec) { s.Name = "" }), want: []string{"pair 1: name: missing"}},
		{name: "name with a slash", specs: with(func(s *Spec) { s.Name = "a/b" }), want: []string{`name: "a/b": use letters`}},
		{name: "name ..", specs: with(func(s *Spec) { s.Name = ".." }), want: []string{"name: \"..\" cannot name a directory"}},
		{name: "same name twice", specs: []Spec{testSpec(), func() Spec { o := other; o.Name = "vm1"; return o }()},
			want: []string{`pair "vm1": name: pair 1 has the same name`}},
		{name: "no a", specs: with(func(s *Spec) { s.URIs[0] = "" }), want: []string{`pair "vm1": a: missing`}},
		{name: "bad b", specs: with(func(s *Spec) { s.URIs[1] = "http://x/y" }), want: []string{"b: invalid NBD URI"}},
		{name: "TLS", specs: with(func(s *Spec) { s.URIs[1] = "nbds://x/y" }), want: []string{"b: nbds://x/y: the kernel cannot speak TLS"}},
		{name: "both legs one export", specs: with(func(s *Spec) { s.URIs[1] = "nbd://192.0.2.2:10809/vm1" }),
			want: []string{"b: nbd://192.0.2.2:10809/vm1 is also vm1.a"}},
		// Two exports, one storage box: the mirror would die with it.
		{name: "both legs one server", specs: with(func(s *Spec) { s.URIs[1] = "nbd://192.0.2.2/vm1-b" }),
			want: []string{`pair "vm1": b: nbd://192.0.2.2:10809/vm1-b is on the same server as a (192.0.2.2:10809): ` +
				"the mirror would have both halves on one storage box; give b the URI of the volume on the other box"}},
		{name: "one server, default port written out", specs: with(func(s *Spec) { s.URIs[1] = "nbd://192.0.2.2:10809/vm1-b" }),
			want: []string{"b: nbd://192.0.2.2:10809/vm1-b is on the same server as a"}},
		{name: "one server, IPv4-mapped IPv6", specs: with(func(s *Spec) { s.URIs[1] = "nbd://[::ffff:192.0.2.2]/vm1-b" }),
			want: []string{"is on the same server as a"}},
		{name: "one server, names differing in case", specs: with(func(s *Spec) {
			s.URIs = [2]string{"nbd://Storage-A.example/vm1", "nbd://storage-a.example./vm1-b"}
		}), want: []string{"b: nbd://storage-a.example.:10809/vm1-b is on the same server as a (Storage-A.example:10809)"}},
		{name: "one Unix socket", specs: with(func(s *Spec) {
			s.URIs = [2]string{"nbd+unix:///vm1?socket=/run/lvnbd.sock", "nbd+unix:///vm1-b?socket=/run//lvnbd.sock"}
		}), want: []string{"b: nbd+unix:///vm1-b?socket=/run//lvnbd.sock is on the same server as a (/run/lvnbd.sock)"}},
		{name: "two Unix sockets", specs: with(func(s *Spec) {
			s.URIs = [2]string{"nbd+unix:///vm1?socket=/run/a.sock", "nbd+unix:///vm1?socket=/run/b.sock"}
		})},
		// Two servers on one host, told apart by their ports: lvnbd cannot
		// know they share a box, as with two names of one machine.
		{name: "one host, two ports", specs: with(func(s *Spec) { s.URIs[1] = "nbd://192.0.2.2:10810/vm1" })},
		{name: "export in two pairs", specs: []Spec{testSpec(), func() Spec { o := other; o.URIs[1] = uriB; return o }()},
			want: []string{`pair "vm2": b: ` + backendB + " is also vm1.b: each leg needs its own export"}},
		// One export however spelt: two guests would write one volume.
		{name: "export in two pairs, host in capitals", specs: twoPairs("nbd://boxa/vm1", "nbd://BOXA/vm1"),
			want: []string{`pair "vm2": a: nbd://BOXA:10809/vm1 is also vm1.a (written nbd://boxa:10809/vm1 there): each leg needs its own export`}},
		{name: "export in two pairs, trailing dot", specs: twoPairs("nbd://boxa/vm1", "nbd://boxa./vm1"),
			want: []string{`pair "vm2": a: nbd://boxa.:10809/vm1 is also vm1.a (written nbd://boxa:10809/vm1 there)`}},
		{name: "export in two pairs, port written out", specs: twoPairs("nbd://boxa/vm1", "nbd://boxa:10809/vm1"),
			want: []string{`pair "vm2": a: nbd://boxa:10809/vm1 is also vm1.a: each leg needs its own export`}},
		{name: "export in two pairs, IPv6 spelt two ways", specs: twoPairs("nbd://[2001:db8::1]/vm1", "nbd://[2001:DB8:0::1]/vm1"),
			want: []string{`pair "vm2": a: nbd://[2001:DB8:0::1]:10809/vm1 is also vm1.a`}},
		{name: "export in two pairs, default export", specs: twoPairs("nbd://boxa", "nbd://BOXA/"),
			want: []string{`pair "vm2": a: nbd://BOXA:10809/ is also vm1.a`}},
		{name: "export in two pairs, socket path", specs: twoPairs("nbd+unix:///vm1?socket=/run/a.sock", "nbd+unix:///vm1?socket=/run//a.sock"),
			want: []string{`pair "vm2": a: nbd+unix:///vm1?socket=/run//a.sock is also vm1.a`}},
		{name: "two exports on one box in two pairs", specs: twoPairs("nbd://boxa/vm1", "nbd://BOXA/vm2")},
		// Reported once, as one export, not also as two on one server.
		{name: "both legs one export, spelt two ways", specs: with(func(s *Spec) {
			s.URIs = [2]string{"nbd://storage-a.example/vm1", "nbd://Storage-A.example./vm1"}
		}), want: []string{`pair "vm1": b: nbd://Storage-A.example.:10809/vm1 is also vm1.a (written nbd://storage-a.example:10809/vm1 there)`}},
		{name: "no connections", specs: with(func(s *Spec) { s.Connections = 0 }), want: []string{"connections: 0: want 1 to 64"}},
		{name: "too many connections", specs: with(func(s *Spec) { s.Connections = 65 }), want: []string{"connections: 65"}},
		{name: "negative timeouts", specs: with(func(s *Spec) { s.Timeout, s.DeadTimeout = -1, -time.Second }),
			want: []string{"timeout: negative", "dead_timeout: negative"}},
		// The kernel never times a request out then: no failover.
		{name: "no timeout", specs: with(func(s *Spec) { s.Timeout = 0 }),
			want: []string{`pair "vm1": timeout: 0 means no request ever times out`}},
		{name: "no dead timeout: I/O fails at once", specs: with(func(s *Spec) { s.DeadTimeout = 0 })},
		{name: "domain without vdevs", specs: with(func(s *Spec) { s.XenDomain = "guest1" }), want: []string{"vdevs: missing"}},
		{name: "domain with a quote", specs: with(func(s *Spec) { s.XenDomain = "g'1"; s.Vdevs = []string{"xvdb", "xvdc"} }),
			want: []string{"xen_domain: "}},
		{name: "one vdev", specs: with(func(s *Spec) { s.Vdevs = []string{"xvdb"} }), want: []string{"vdevs: 1 names: want two"}},
		{name: "same vdev twice", specs: with(func(s *Spec) { s.Vdevs = []string{"xvdb", "xvdb"} }), want: []string{`vdevs: both legs are "xvdb"`}},
		{name: "vdev with a comma", specs: with(func(s *Spec) { s.Vdevs = []string{"xvdb,", "xvdc"} }), want: []string{`vdevs: "xvdb," is not`}},
		{name: "vdev of another pair", specs: []Spec{xenSpec(), func() Spec {
			o := other
			o.XenDomain, o.Vdevs = "guest1", []string{"xvdd", "xvdc"}
			return o
		}()}, want: []string{`pair "vm2": vdevs: xvdc is also pair "vm1"'s device in domain guest1`}},
		{name: "every problem at once", specs: with(func(s *Spec) { s.Name, s.URIs[0], s.Connections = "", "", 0 }),
			want: []string{"name: missing", "a: missing", "connections: 0"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateSpecs(tt.specs)
			var got []string
			if err != nil {
				for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
					var se *SpecError
					if !errors.As(e, &se) {
						t.Errorf("%v is not a *SpecError", e)
					}
					got = append(got, e.Error())
				}
			}
			if len(got) != len(tt.want) {
				t.Fatalf("errors %q, want %d: %q", got, len(tt.want), tt.want)
			}
			for i := range got {
				if !strings.Contains(got[i], tt.want[i]) {
					t.Errorf("error %d: %q, want one with %q", i, got[i], tt.want[i])
				}
			}
		})
	}
}

// twoPairs is pairs vm1 and vm2 whose legs a are exports aOfVM1 and
// aOfVM2, and whose legs b are on boxes of their own.
func twoPairs(aOfVM1, aOfVM2 string) []Spec {
	return []Spec{
		{Name: "vm1", URIs: [2]string{aOfVM1, "nbd://198.51.100.1/vm1"}, Connections: 1, Timeout: 30 * time.Second},
		{Name: "vm2", URIs: [2]string{aOfVM2, "nbd://203.0.113.1/vm2"}, Connections: 1, Timeout: 30 * time.Second},
	}
}

func TestXenDisks(t *testing.T) {
	got, err := xenSpec().XenDisks("/dev/lvnbd")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"format=raw, vdev=xvdb, access=rw, target=/dev/lvnbd/vm1/a",
		"format=raw, vdev=xvdc, access=rw, target=/dev/lvnbd/vm1/b",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	var se *SpecError
	if _, err := testSpec().XenDisks("/dev/lvnbd"); !errors.As(err, &se) || se.Key != "vdevs" {
		t.Errorf("without vdevs: %v, want a SpecError for vdevs", err)
	}
}
