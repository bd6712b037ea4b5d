package fenceagent

import (
	"context"
	"encoding/xml"
	"errors"
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
	if code, _, errOut := run(Args{Action: "off", Plug: "h1"}); code != ExitOK {
		t.Fatalf("off: %d %s", code, errOut)
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
