package client

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

var uriTests = []struct {
	in      string
	want    URI
	wantErr string // substring; empty means success
}{
	// The examples of doc/uri.md.
	{in: "nbd://example.com/disk", want: URI{Scheme: "nbd", Host: "example.com", Port: 10809, Export: "disk"}},
	{in: "nbd+unix:///disk?socket=sock", want: URI{Scheme: "nbd+unix", Socket: "sock", Export: "disk"}},
	{in: "nbd://example.com/", want: URI{Scheme: "nbd", Host: "example.com", Port: 10809}},
	{in: "nbd://example.com", want: URI{Scheme: "nbd", Host: "example.com", Port: 10809}},
	{in: "nbd://example.com//disk", want: URI{Scheme: "nbd", Host: "example.com", Port: 10809, Export: "/disk"}},
	{in: "nbd://example.com/hello%20world", want: URI{Scheme: "nbd", Host: "example.com", Port: 10809, Export: "hello world"}},
	{in: "nbd+unix:///?socket=%00/abstract", want: URI{Scheme: "nbd+unix", Socket: "\x00/abstract"}},
	// Ports, addresses, escapes.
	{in: "nbd://10.0.0.1:10810/vm1", want: URI{Scheme: "nbd", Host: "10.0.0.1", Port: 10810, Export: "vm1"}},
	{in: "nbd://[::1]/vm1", want: URI{Scheme: "nbd", Host: "::1", Port: 10809, Export: "vm1"}},
	{in: "nbd://[2001:db8::7]:9000/a/b", want: URI{Scheme: "nbd", Host: "2001:db8::7", Port: 9000, Export: "a/b"}},
	{in: "nbd://[fe80::1%25eth0]:10809/x", want: URI{Scheme: "nbd", Host: "fe80::1%eth0", Port: 10809, Export: "x"}},
	{in: "nbd://host:/x", want: URI{Scheme: "nbd", Host: "host", Port: 10809, Export: "x"}},
	{in: "NBD://Host/x", want: URI{Scheme: "nbd", Host: "Host", Port: 10809, Export: "x"}},
	{in: "nbd://h/%E2%82%AC%2F%3F", want: URI{Scheme: "nbd", Host: "h", Port: 10809, Export: "€/?"}},
	{in: "nbd+unix:///vm1?socket=/run/lvnbd%20x.sock", want: URI{Scheme: "nbd+unix", Socket: "/run/lvnbd x.sock", Export: "vm1"}},
	{in: "nbd+unix://?socket=/s", want: URI{Scheme: "nbd+unix", Socket: "/s"}},
	// Queries are RFC 3986's, not HTML forms': "+" is a plus, ";" an
	// ordinary character, and a space is %20.
	{in: "nbd+unix:///vm1?socket=/run/a+b.sock", want: URI{Scheme: "nbd+unix", Socket: "/run/a+b.sock", Export: "vm1"}},
	{in: "nbd+unix:///vm1?socket=/run/a;b.sock", want: URI{Scheme: "nbd+unix", Socket: "/run/a;b.sock", Export: "vm1"}},
	{in: "nbd+unix:///vm1?socket=/run/a%2Bb%20c%3Bd.sock", want: URI{Scheme: "nbd+unix", Socket: "/run/a+b c;d.sock", Export: "vm1"}},
	{in: "nbds://h/vm1?tls-hostname=a+b&&tls-type=x%3D1%26", want: URI{Scheme: "nbds", Host: "h", Port: 10809, Export: "vm1", TLSHostname: "a+b", TLSType: "x=1&"}},
	// TLS forms; libnbd's tls-certificates too, so nbdinfo's URIs work.
	{in: "nbds://alice@storage-a/vm1?tls-type=x509&tls-verify-peer=0",
		want: URI{Scheme: "nbds", User: "alice", Host: "storage-a", Port: 10809, Export: "vm1", TLSType: "x509", TLSVerifyPeer: "0"}},
	{in: "nbds+unix:///vm1?socket=/s&tls-hostname=a.example",
		want: URI{Scheme: "nbds+unix", Socket: "/s", Export: "vm1", TLSHostname: "a.example"}},
	{in: "nbds://storage-a/vm1?tls-certificates=/etc/lvnbd/pki",
		want: URI{Scheme: "nbds", Host: "storage-a", Port: 10809, Export: "vm1", TLSCertificates: "/etc/lvnbd/pki"}},
	// Errors.
	{in: "", wantErr: "no scheme"},
	{in: "storage-a/vm1", wantErr: "no scheme"},
	{in: "http://h/x", wantErr: "unknown scheme"},
	{in: "nbd:h/x", wantErr: "want nbd://"},
	{in: "nbd:///x", wantErr: "no host"},
	{in: "nbd://h:0/x", wantErr: "port"},
	{in: "nbd://h:70000/x", wantErr: "port"},
	{in: "nbd://h:x/x", wantErr: "port"},
	{in: "nbd://::1/x", wantErr: "brackets"},
	{in: "nbd://[::%25\xfd]", wantErr: "IPv6 zone"},
	{in: "nbd://[fe80::1%25eth%C3%A9]/x", wantErr: "invalid URL escape"},
	{in: "nbd://[fe80::1%25a%20b]/x", wantErr: "IPv6 zone"},
	{in: "nbd://h/a%00b", wantErr: "NUL"},
	{in: "nbd://h/%zz", wantErr: "invalid URL escape"},
	{in: "nbd://h/x?socket=/s", wantErr: "only for nbd+unix"},
	{in: "nbd://h/x?foo=1", wantErr: "unknown query parameter"},
	{in: "nbd://h/x?tls-type=a&tls-type=b", wantErr: "given 2 times"},
	{in: "nbd://h/x?tls-verify-peer=yes", wantErr: "tls-verify-peer"},
	{in: "nbd://h/x?tls-type=%zz", wantErr: "invalid URL escape"},
	{in: "nbd://h/x?tls%zz=1", wantErr: "invalid URL escape"},
	{in: "nbd://h/x?=1", wantErr: "unknown query parameter \"\""},
	{in: "nbd://h/x?tls-type=a;tls-type=b&tls-type=c", wantErr: "given 2 times"},
	{in: "nbd://h/x#frag", wantErr: "fragment"},
	{in: "nbd://u:pw@h/x", wantErr: "password"},
	{in: "nbd+unix:///x", wantErr: "needs ?socket"},
	{in: "nbd+unix:///x?socket=", wantErr: "needs ?socket"},
	{in: "nbd+unix://h/x?socket=/s", wantErr: "no host"},
	{in: "nbd://h/" + strings.Repeat("a", 4097), wantErr: "over the protocol"},
}

func TestParseURI(t *testing.T) {
	for _, tt := range uriTests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseURI(tt.in)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("ParseURI(%q) = %+v, want an error containing %q", tt.in, got, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrBadURI) {
					t.Fatalf("ParseURI(%q) error %q, want one wrapping ErrBadURI containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseURI(%q): %v", tt.in, err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("ParseURI(%q) (-want +got):\n%s", tt.in, diff)
			}
			again, err := ParseURI(got.String())
			if err != nil {
				t.Fatalf("ParseURI(%q) of String(): %v", got.String(), err)
			}
			if diff := cmp.Diff(got, again); diff != "" {
				t.Errorf("round trip through %q (-want +got):\n%s", got.String(), diff)
			}
		})
	}
}

// String writes query values so that RFC 3986 readers (libnbd, qemu) see
// what ParseURI sees: a space as %20, a plus as %2B. Otherwise it writes
// what earlier versions did, since the string is also a kernel device's
// backend identifier, which a restarted daemon must find again: a colon as
// %3A, a slash as itself.
func TestURIString(t *testing.T) {
	tests := []struct {
		name string
		in   URI
		want string
	}{
		{"space, plus and semicolon in a socket path",
			URI{Scheme: "nbd+unix", Socket: "/run/a b+c;d.sock", Export: "vm1"},
			"nbd+unix:///vm1?socket=/run/a%20b%2Bc%3Bd.sock"},
		{"as earlier versions wrote it: colon and at sign escaped",
			URI{Scheme: "nbd+unix", Socket: "/run/box-a:1@x.sock", Export: "vm1"},
			"nbd+unix:///vm1?socket=/run/box-a%3A1%40x.sock"},
		{"query delimiters in a value",
			URI{Scheme: "nbds", Host: "h", Port: 10809, Export: "x", TLSType: "a&b=c#d%e"},
			"nbds://h:10809/x?tls-type=a%26b%3Dc%23d%25e"},
		{"every TLS parameter, in a fixed order",
			URI{Scheme: "nbds", Host: "h", Port: 10809, Export: "x", TLSCertificates: "/etc/pki dir", TLSVerifyPeer: "1", TLSHostname: "s.example", TLSType: "x509"},
			"nbds://h:10809/x?tls-type=x509&tls-hostname=s.example&tls-verify-peer=1&tls-certificates=/etc/pki%20dir"},
		{"abstract socket",
			URI{Scheme: "nbd+unix", Socket: "\x00/abstract"},
			"nbd+unix:///?socket=%00/abstract"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.in.String(); got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
			back, err := ParseURI(tt.want)
			if err != nil {
				t.Fatalf("ParseURI(%q): %v", tt.want, err)
			}
			if diff := cmp.Diff(tt.in, back); diff != "" {
				t.Errorf("ParseURI(%q) (-want +got):\n%s", tt.want, diff)
			}
		})
	}
}

func TestURIAddress(t *testing.T) {
	tests := []struct {
		in, network, address string
	}{
		{"nbd://example.com/disk", "tcp", "example.com:10809"},
		{"nbd://[::1]:9/disk", "tcp", "[::1]:9"},
		{"nbd+unix:///disk?socket=/run/x.sock", "unix", "/run/x.sock"},
		{"nbd+unix:///?socket=%00/abstract", "unix", "@/abstract"},
	}
	for _, tt := range tests {
		u, err := ParseURI(tt.in)
		if err != nil {
			t.Fatal(err)
		}
		if u.Network() != tt.network || u.Address() != tt.address {
			t.Errorf("%s: got %s %s, want %s %s", tt.in, u.Network(), u.Address(), tt.network, tt.address)
		}
	}
}

// FuzzParseURI checks that ParseURI never panics and that whatever it
// accepts prints to a URI that parses back to the same thing.
func FuzzParseURI(f *testing.F) {
	for _, tt := range uriTests {
		f.Add(tt.in)
	}
	// Where form decoding and RFC 3986 part: "+", ";" and %20.
	for _, s := range []string{
		"nbd+unix:///?socket=+",
		"nbd+unix:///?socket=%2B+%20",
		"nbd://h/x?tls-type=;&tls-hostname=a;b",
		"nbd://h/a+b%20c?tls-type=%20",
		"nbds+unix:///x?socket=/s;tls-type=x509",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			return
		}
		again, err := ParseURI(u.String())
		if err != nil {
			t.Fatalf("ParseURI(%q) = %+v, but its String() %q does not parse: %v", s, u, u.String(), err)
		}
		if diff := cmp.Diff(u, again); diff != "" {
			t.Fatalf("round trip of %q through %q (-want +got):\n%s", s, u.String(), diff)
		}
	})
}

// Server puts two URIs of one server on the same name, without DNS.
func TestURIServer(t *testing.T) {
	for _, tc := range []struct{ uri, want string }{
		{"nbd://storage-a/vm1", "storage-a:10809"},
		{"nbd://Storage-A.example./vm2", "storage-a.example:10809"},
		{"nbd://10.0.1.1:10809/vm1", "10.0.1.1:10809"},
		{"nbd://10.0.1.1:10900/vm1", "10.0.1.1:10900"},
		{"nbd://[::ffff:10.0.1.1]/vm1", "10.0.1.1:10809"},
		{"nbd://[2001:db8::1]/vm1", "[2001:db8::1]:10809"},
		{"nbd+unix:///vm1?socket=/run/lvnbd//a.sock", "unix:/run/lvnbd/a.sock"},
	} {
		u, err := ParseURI(tc.uri)
		if err != nil {
			t.Fatalf("ParseURI(%q): %v", tc.uri, err)
		}
		if got := u.Server(); got != tc.want {
			t.Errorf("%s: Server() = %q, want %q", tc.uri, got, tc.want)
		}
	}
}

// ExportKey puts the spellings of one export on one key, so that the checks
// that no export is used twice see through case, a trailing dot and an
// implicit port; different exports keep different keys.
func TestURISameExport(t *testing.T) {
	tests := []struct {
		name string
		a, b string
		same bool
	}{
		{"as written", "nbd://boxa/vm1", "nbd://boxa/vm1", true},
		{"host in capitals", "nbd://boxa/vm1", "nbd://BOXA/vm1", true},
		{"trailing dot", "nbd://boxa/vm1", "nbd://boxa./vm1", true},
		{"capitals and trailing dot", "nbd://storage-a.example/vm1", "nbd://Storage-A.Example./vm1", true},
		{"default port written out", "nbd://boxa/vm1", "nbd://boxa:10809/vm1", true},
		{"empty port", "nbd://boxa:/vm1", "nbd://boxa/vm1", true},
		{"default export, with and without slash", "nbd://boxa", "nbd://boxa/", true},
		{"export percent-encoded", "nbd://boxa/vm%31", "nbd://boxa/vm1", true},
		{"IPv6 spelt two ways", "nbd://[2001:db8:0:0::1]/vm1", "nbd://[2001:DB8::1]:10809/vm1", true},
		{"IPv4-mapped IPv6", "nbd://[::ffff:192.0.2.1]/vm1", "nbd://192.0.2.1/vm1", true},
		{"TLS and user: the same export", "nbds://alice@boxa/vm1?tls-type=x509", "nbd://boxa/vm1", true},
		{"socket path cleaned", "nbd+unix:///vm1?socket=/run//lvnbd.sock", "nbd+unix:///vm1?socket=/run/lvnbd.sock", true},

		{"another export", "nbd://boxa/vm1", "nbd://boxa/vm2", false},
		{"export names differ in case", "nbd://boxa/vm1", "nbd://boxa/VM1", false},
		{"the default export is not a named one", "nbd://boxa/", "nbd://boxa/vm1", false},
		{"a leading slash is part of the name", "nbd://boxa//vm1", "nbd://boxa/vm1", false},
		{"another host", "nbd://boxa/vm1", "nbd://boxb/vm1", false},
		{"another port", "nbd://boxa/vm1", "nbd://boxa:10810/vm1", false},
		{"two trailing dots are not one", "nbd://boxa../vm1", "nbd://boxa/vm1", false},
		{"another socket", "nbd+unix:///vm1?socket=/run/a.sock", "nbd+unix:///vm1?socket=/run/b.sock", false},
		// Server() writes both as "unix:10809".
		{"host unix, socket 10809", "nbd://unix/vm1", "nbd+unix:///vm1?socket=10809", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := ParseURI(tt.a)
			if err != nil {
				t.Fatal(err)
			}
			b, err := ParseURI(tt.b)
			if err != nil {
				t.Fatal(err)
			}
			if got := a.SameExport(b); got != tt.same {
				t.Errorf("%s SameExport %s = %v, want %v (keys %+v, %+v)", tt.a, tt.b, got, tt.same, a.ExportKey(), b.ExportKey())
			}
			if got := b.SameExport(a); got != tt.same {
				t.Errorf("not symmetric: %s SameExport %s = %v", tt.b, tt.a, got)
			}
		})
	}
}

// FuzzExportKey checks that whatever ParseURI accepts keeps its export key
// through String, and with its host in capitals and a trailing dot added.
func FuzzExportKey(f *testing.F) {
	for _, tt := range uriTests {
		f.Add(tt.in)
	}
	f.Add("nbd://Storage-A.example./vm1")
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			return
		}
		again, err := ParseURI(u.String())
		if err != nil {
			t.Fatalf("ParseURI(%q) of String(): %v", u.String(), err)
		}
		if !u.SameExport(again) {
			t.Fatalf("%q: key %+v, through String() %+v", s, u.ExportKey(), again.ExportKey())
		}
		if u.IsUnix() {
			return
		}
		v := u
		v.Host = strings.Map(func(r rune) rune {
			if r >= 'a' && r <= 'z' {
				return r - 'a' + 'A'
			}
			return r
		}, u.Host)
		if !strings.HasSuffix(v.Host, ".") {
			v.Host += "."
		}
		if !u.SameExport(v) {
			t.Fatalf("%q: key %+v, with host %q %+v", s, u.ExportKey(), v.Host, v.ExportKey())
		}
	})
}
