package fenceagent

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/server"
)

func TestParseArgs(t *testing.T) {
	tests := []struct {
		in      string
		want    Args
		wantErr bool
	}{
		{"action=off\nplug=10.0.0.21\n", Args{Action: "off", Plug: "10.0.0.21", Control: control.DefaultPath}, false},
		{"option=on\nport=dom0-a\nservers=a, b,\nexport=vm1\ncontrol=/x.sock\nnodename=n1\n",
			Args{Action: "on", Plug: "dom0-a", Export: "vm1", Servers: []string{"a", "b"}, Control: "/x.sock"}, false},
		{"# comment\n\n", Args{Action: "reboot", Control: control.DefaultPath}, false},
		{"garbage\n", Args{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseArgs(strings.NewReader(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("error %v, want error %v", err, tt.wantErr)
			}
			if tt.wantErr {
				return
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func FuzzParseArgs(f *testing.F) {
	f.Add("action=off\nplug=10.0.0.21\n")
	f.Add("servers=a,b\n#x\n")
	f.Fuzz(func(t *testing.T, in string) {
		a, err := ParseArgs(strings.NewReader(in))
		if err != nil {
			return
		}
		for _, s := range a.Servers {
			if s == "" || strings.Contains(s, ",") {
				t.Fatalf("server %q from %q", s, in)
			}
		}
	})
}

// fakeBox records calls and keeps a fence list.
type fakeBox struct {
	name   string
	fences []server.Fence
	calls  []string
	fail   error
}

func (b *fakeBox) Name() string { return b.name }
func (b *fakeBox) Fence(_ context.Context, client, export string) error {
	b.calls = append(b.calls, "fence "+client+" "+export)
	if b.fail != nil {
		return b.fail
	}
	b.fences = append(b.fences, server.Fence{Client: client, Export: export})
	return nil
}
func (b *fakeBox) Unfence(_ context.Context, client, export string) error {
	b.calls = append(b.calls, "unfence "+client+" "+export)
	for i, f := range b.fences {
		if f.Client == client && f.Export == export {
			b.fences = append(b.fences[:i], b.fences[i+1:]...)
			return nil
		}
	}
	return errNotFenced
}
func (b *fakeBox) Fences(context.Context) ([]server.Fence, error) { return b.fences, b.fail }
func (b *fakeBox) Status(context.Context) (control.Status, error) {
	return control.Status{Exports: []server.ExportStatus{{Name: "vm1", Clients: []server.ClientInfo{
		{Peer: "10.0.0.21:4000"}, {Peer: "[fd00::5]:4001"}, {Peer: "10.0.0.21:4002"}}}}}, b.fail
}

func TestRun(t *testing.T) {
	ctx := context.Background()
	a, b := &fakeBox{name: "a"}, &fakeBox{name: "b"}
	boxes := []Box{a, b}
	run := func(args Args) (int, string, string) {
		var out, errOut strings.Builder
		code := Run(ctx, args, boxes, &out, &errOut)
		return code, out.String(), errOut.String()
	}
	if code, out, _ := run(Args{Action: "status", Plug: "h1"}); code != ExitOK || !strings.Contains(out, "ON") {
		t.Fatalf("status before fencing: %d %q", code, out)
	}
	if code, out, errOut := run(Args{Action: "off", Plug: "h1"}); code != ExitOK || !strings.Contains(out, "Success: h1 fenced off all exports on 2 box(es)") {
		t.Fatalf("off: %d %q %s; want success said", code, out, errOut)
	}
	if diff := cmp.Diff([]string{"fence h1 "}, a.calls); diff != "" || len(b.calls) != 1 {
		t.Fatalf("off did not fence on every box (-want +got):\n%s", diff)
	}
	if code, out, _ := run(Args{Action: "status", Plug: "h1"}); code != ExitOff || !strings.Contains(out, "OFF") {
		t.Fatalf("status after fencing: %d %q", code, out)
	}
	if code, _, _ := run(Args{Action: "reboot", Plug: "h2"}); code != ExitOK || len(a.fences) != 2 {
		t.Fatalf("reboot should fence: %d %+v", code, a.fences)
	}
	if code, _, _ := run(Args{Action: "on", Plug: "h1"}); code != ExitOK || len(a.fences) != 1 {
		t.Fatalf("on: %d %+v", code, a.fences)
	}
	if code, _, _ := run(Args{Action: "on", Plug: "never-fenced"}); code != ExitOK {
		t.Fatalf("on for a host that is not fenced: %d", code)
	}
	if code, out, _ := run(Args{Action: "list"}); code != ExitOK || out != "10.0.0.21,\nfd00::5,\n" {
		t.Fatalf("list: %d %q", code, out)
	}
	if code, _, errOut := run(Args{Action: "off"}); code != ExitError || !strings.Contains(errOut, "plug") {
		t.Fatalf("off without plug: %d %q", code, errOut)
	}
	if code, _, _ := run(Args{Action: "dance", Plug: "x"}); code != ExitError {
		t.Fatalf("unknown action: %d", code)
	}
	b.fail = errors.New("box b unreachable")
	if code, _, errOut := run(Args{Action: "off", Plug: "h3"}); code != ExitError || !strings.Contains(errOut, "b: box b unreachable") {
		t.Fatalf("a failing box must fail the action: %d %q", code, errOut)
	}
	code, out, _ := run(Args{Action: "metadata"})
	var meta struct {
		Name string `xml:"name,attr"`
	}
	if code != ExitOK || xml.Unmarshal([]byte(out), &meta) != nil || meta.Name != "fence_lvnbd" {
		t.Fatalf("metadata: %d %v", code, meta)
	}
}

// A plug that no client can match is refused before any box is asked:
// each box would otherwise fence nothing and report success.
func TestRunRefusesAPlugThatMatchesNothing(t *testing.T) {
	for _, plug := range []string{"10.0.1.300", "fe80::1%", "10.0.0.0/33", "dom0 a"} {
		t.Run(plug, func(t *testing.T) {
			a := &fakeBox{name: "a"}
			var out, errOut strings.Builder
			if code := Run(context.Background(), Args{Action: "off", Plug: plug}, []Box{a}, &out, &errOut); code != ExitError {
				t.Errorf("off with plug %q: exit %d, want %d", plug, code, ExitError)
			}
			if len(a.calls) != 0 {
				t.Errorf("boxes were asked: %v", a.calls)
			}
		})
	}
}

// status is OFF only when every box fences the host: where one does not,
// the host can still write.
func TestStatusNeedsEveryBox(t *testing.T) {
	tests := []struct {
		name     string
		a, b     []server.Fence
		wantCode int
	}{
		{"on no box", nil, nil, ExitOK},
		{"on one box of two", []server.Fence{{Client: "10.0.1.21"}}, nil, ExitOK},
		{"on both boxes", []server.Fence{{Client: "10.0.1.21"}}, []server.Fence{{Client: "::ffff:10.0.1.21"}}, ExitOff},
		{"off one export only", []server.Fence{{Client: "10.0.1.21"}}, []server.Fence{{Client: "10.0.1.21", Export: "vm1"}}, ExitOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			boxes := []Box{&fakeBox{name: "a", fences: tt.a}, &fakeBox{name: "b", fences: tt.b}}
			var out, errOut strings.Builder
			if code := Run(context.Background(), Args{Action: "status", Plug: "10.0.1.21"}, boxes, &out, &errOut); code != tt.wantCode {
				t.Errorf("status: exit %d (%q), want %d", code, out.String(), tt.wantCode)
			}
		})
	}
}

// sshRecorder records the commands an sshBox runs and answers each with
// out.
type sshRecorder struct {
	calls [][]string
	out   []byte
}

func (r *sshRecorder) run(_ context.Context, name string, args ...string) ([]byte, error) {
	r.calls = append(r.calls, append([]string{name}, args...))
	return r.out, nil
}

// remoteArgs is what the box's shell makes of what ssh sends it: ssh joins
// the words after the destination with spaces into one shell line.
func remoteArgs(t *testing.T, call []string) []string {
	t.Helper()
	i := slices.IndexFunc(call, func(s string) bool { return strings.HasPrefix(s, "root@") })
	if call[0] != "ssh" || i < 0 {
		t.Fatalf("not an ssh command to root@: %q", call)
	}
	line := strings.Join(call[i+1:], " ")
	out, err := exec.Command("sh", "-c", "eval \"set -- $1\"; printf '%s\\0' \"$@\"", "sh", line).Output()
	if err != nil {
		t.Fatalf("the shell could not parse %q: %v", line, err)
	}
	return strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
}

func TestSSHQuotesEveryArgument(t *testing.T) {
	ctx := context.Background()
	plug := `dom0 a'b; $(true) "*`
	r := &sshRecorder{out: []byte(fmt.Sprintf(`[{"client":%q}]`, plug))}
	b := &sshBox{host: "store-a", control: "/run/lvnbd/control sock", r: r}
	if err := b.Fence(ctx, plug, "vm 1"); err != nil {
		t.Fatal(err)
	}
	if err := b.Unfence(ctx, plug, ""); err != nil {
		t.Fatal(err)
	}
	want := [][]string{
		{"lvnbd", "fence", plug, "--export", "vm 1", "--control", "/run/lvnbd/control sock"},
		{"lvnbd", "fence", "--list", "--json", "--control", "/run/lvnbd/control sock"},
		{"lvnbd", "unfence", plug, "--control", "/run/lvnbd/control sock"},
	}
	var got [][]string
	for _, call := range r.calls {
		got = append(got, remoteArgs(t, call))
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("commands run on the box (-want +got):\n%s", diff)
	}
}

func TestShellQuote(t *testing.T) {
	for _, s := range []string{"", "plain", "a b", "it's", `"$x"`, "a\nb", "10.0.1.21", "fe80::1%eth0"} {
		out, err := exec.Command("sh", "-c", "printf '%s' "+shellQuote(s)).Output()
		if err != nil || !bytes.Equal(out, []byte(s)) {
			t.Errorf("shellQuote(%q) = %s: the shell reads %q, %v", s, shellQuote(s), out, err)
		}
	}
}
