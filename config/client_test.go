package config

import (
	"bytes"
	"testing"
	"time"
)

var validClient = []struct {
	name string
	doc  string
	want []Pair
}{
	{"empty", "", nil},
	{"defaults", "[[pair]]\nname = \"vm1\"\na = \"nbd://10.0.1.1/vm1\"\nb = \"nbd://10.0.2.1/vm1\"\n",
		[]Pair{{Name: "vm1", A: "nbd://10.0.1.1/vm1", B: "nbd://10.0.2.1/vm1", Connections: 1, Timeout: 30 * time.Second, DeadTimeout: time.Minute}}},
	// Two servers told apart by their ports: lvnbd cannot know they share a
	// box, as with two names of one machine.
	{"one host, two ports", "[[pair]]\nname = \"vm1\"\na = \"nbd://10.0.1.1/vm1\"\nb = \"nbd://10.0.1.1:10810/vm1\"\n",
		[]Pair{{Name: "vm1", A: "nbd://10.0.1.1/vm1", B: "nbd://10.0.1.1:10810/vm1", Connections: 1, Timeout: 30 * time.Second, DeadTimeout: time.Minute}}},
	{"everything", `
[[pair]]
name = "vm1"
a = "nbd://10.0.1.1/vm1"
b = "nbd://10.0.2.1:10810/vm1"
connections = 2
timeout = "10s"
dead_timeout = "0s"
xen_domain = "vm1"
vdevs = ["xvdb", "xvdc"]

[[pair]]
name = "vm2"
a = "nbd+unix:///vm2?socket=/run/a.sock"
b = "nbd://[fd00::2]/vm2"
xen_domain = "vm1"
vdevs = ["xvdd", "xvde"]
`, []Pair{
		{Name: "vm1", A: "nbd://10.0.1.1/vm1", B: "nbd://10.0.2.1:10810/vm1", Connections: 2, Timeout: 10 * time.Second,
			XenDomain: "vm1", Vdevs: []string{"xvdb", "xvdc"}},
		{Name: "vm2", A: "nbd+unix:///vm2?socket=/run/a.sock", B: "nbd://[fd00::2]/vm2", Connections: 1, Timeout: 30 * time.Second,
			DeadTimeout: time.Minute, XenDomain: "vm1", Vdevs: []string{"xvdd", "xvde"}},
	}},
}

func TestParseClientValid(t *testing.T) {
	for _, tt := range validClient {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseClient([]byte(tt.doc), "client.toml")
			if err != nil {
				t.Fatal(err)
			}
			if d := diff(&ClientConfig{Pairs: tt.want}, got); d != "" {
				t.Errorf("(-want +got)\n%s", d)
			}
		})
	}
}

const pairHead = "[[pair]]\nname = \"vm1\"\na = \"nbd://10.0.1.1/vm1\"\nb = \"nbd://10.0.2.1/vm1\"\n"

var invalidClient = []struct {
	name, doc, key, msg string
	line                int
}{
	{"unknown top-level key", "[client]\n", "client", "unknown key", 1},
	{"pair as a table", "[pair]\nname = \"vm1\"\n", "pair", "[[pair]]", 1},
	{"unknown pair key", pairHead + "conections = 2\n", "pair[0].conections", "did you mean connections?", 5},
	{"no name", "[[pair]]\na = \"nbd://10.0.1.1/vm1\"\nb = \"nbd://10.0.2.1/vm1\"\n", "pair[0].name", "needs a name", 1},
	{"bad name", "[[pair]]\nname = \"vm/1\"\na = \"nbd://10.0.1.1/vm1\"\nb = \"nbd://10.0.2.1/vm1\"\n", "pair[0].name", "pair name", 2},
	{"names twice", pairHead + pairHead, "pair[1].name", "unique", 6},
	{"no leg b", "[[pair]]\nname = \"vm1\"\na = \"nbd://10.0.1.1/vm1\"\n", "pair[0].b", "NBD URI", 1},
	{"bad leg a", "[[pair]]\nname = \"vm1\"\na = \"http://10.0.1.1/vm1\"\nb = \"nbd://10.0.2.1/vm1\"\n", "pair[0].a", "want nbd", 3},
	{"same legs", "[[pair]]\nname = \"vm1\"\na = \"nbd://10.0.1.1/vm1\"\nb = \"nbd://10.0.1.1/vm1\"\n", "pair[0].b", "other storage box", 4},
	{"same legs, default port written out", "[[pair]]\nname = \"vm1\"\na = \"nbd://10.0.1.1/vm1\"\nb = \"nbd://10.0.1.1:10809/vm1\"\n",
		"pair[0].b", "the same URI as a", 4},
	// Two exports on one storage box: the mirror would die with it.
	{"legs on one server", "[[pair]]\nname = \"vm1\"\na = \"nbd://10.0.1.1/vm1\"\nb = \"nbd://10.0.1.1:10809/vm1-b\"\n",
		"pair[0].b", "nbd://10.0.1.1:10809/vm1-b is on the same server as a (10.0.1.1:10809): " +
			"the mirror would have both halves on one storage box; give b the URI of the volume on the other box", 4},
	{"legs on one server, names differing in case", "[[pair]]\nname = \"vm1\"\na = \"nbd://Storage-A/vm1\"\nb = \"nbd://storage-a./vm1-b\"\n",
		"pair[0].b", "on the same server as a (Storage-A:10809)", 4},
	{"legs on one server, IPv4-mapped IPv6", "[[pair]]\nname = \"vm1\"\na = \"nbd://10.0.1.1/vm1\"\nb = \"nbd://[::ffff:10.0.1.1]/vm1-b\"\n",
		"pair[0].b", "on the same server as a", 4},
	{"legs on one Unix socket", "[[pair]]\nname = \"vm1\"\na = \"nbd+unix:///vm1?socket=/run/lvnbd.sock\"\nb = \"nbd+unix:///vm1-b?socket=/run//lvnbd.sock\"\n",
		"pair[0].b", "on the same server as a (/run/lvnbd.sock)", 4},
	{"zero connections", pairHead + "connections = 0\n", "pair[0].connections", "want 1 to 16", 5},
	{"too many connections", pairHead + "connections = 17\n", "pair[0].connections", "want 1 to 16", 5},
	{"timeout as number", pairHead + "timeout = 30\n", "pair[0].timeout", `such as "30s"`, 5},
	{"no timeout", pairHead + "timeout = \"0s\"\n", "pair[0].timeout", `no request ever times out, so a storage box that goes silent hangs the guest instead of failing the leg: want a timeout such as "30s"`, 5},
	{"negative dead timeout", pairHead + "dead_timeout = \"-1s\"\n", "pair[0].dead_timeout", "negative", 5},
	{"domain with space", pairHead + "xen_domain = \"vm 1\"\n", "pair[0].xen_domain", "no spaces", 5},
	{"one vdev", pairHead + "xen_domain = \"vm1\"\nvdevs = [\"xvdb\"]\n", "pair[0].vdevs", "want two", 6},
	{"bad vdev", pairHead + "xen_domain = \"vm1\"\nvdevs = [\"xvdb\", \"/dev/sdc\"]\n", "pair[0].vdevs[1]", "such as \"xvdb\"", 6},
	{"vdev used twice", pairHead + "xen_domain = \"vm1\"\nvdevs = [\"xvdb\", \"xvdc\"]\n" +
		"[[pair]]\nname = \"vm2\"\na = \"nbd://10.0.1.1/vm2\"\nb = \"nbd://10.0.2.1/vm2\"\nxen_domain = \"vm1\"\nvdevs = [\"xvdc\", \"xvdd\"]\n",
		"pair[1].vdevs[0]", "already used by pair[0].vdevs[1]", 12},
}

func TestParseClientInvalid(t *testing.T) {
	for _, tt := range invalidClient {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseClient([]byte(tt.doc), "client.toml")
			if err == nil {
				t.Fatalf("parsed: %+v", c)
			}
			wantProblem(t, err, tt.key, tt.msg, tt.line)
		})
	}
}

func TestClientWriteTOMLRoundTrip(t *testing.T) {
	for _, tt := range validClient {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseClient([]byte(tt.doc), "")
			if err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			if err := c.WriteTOML(&buf); err != nil {
				t.Fatal(err)
			}
			back, err := ParseClient(buf.Bytes(), "printed")
			if err != nil {
				t.Fatalf("printed configuration does not parse: %v\n%s", err, buf.String())
			}
			if d := diff(c, back); d != "" {
				t.Errorf("round trip (-printed +parsed)\n%s\n%s", d, buf.String())
			}
		})
	}
}

// vdevs without xen_domain is how disks are written into a domain's own
// configuration file (lvnbd pair xen-config) without pair up attaching them.
func TestParseClientVdevsWithoutDomain(t *testing.T) {
	c, err := ParseClient([]byte(pairHead+"vdevs = [\"xvdb\", \"xvdc\"]\n"), "client.toml")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Pairs[0].Vdevs; len(got) != 2 || got[0] != "xvdb" {
		t.Fatalf("vdevs %v", got)
	}
}
