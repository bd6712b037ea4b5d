// Package fenceagent lets Pacemaker's stonith fence a hypervisor host off
// lvnbd storage boxes. It speaks the fence-agents protocol: key=value lines
// on standard input (action=off|on|reboot|status|monitor|list|metadata,
// plug=CLIENT, …) and the conventional exit codes.
package fenceagent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"

	"github.com/lvnbd/lvnbd/control"
	"github.com/lvnbd/lvnbd/server"
	"github.com/lvnbd/lvnbd/volume"
)

// Exit codes of the fence-agents protocol. status answers ExitOK for a
// client that is not fenced ("on") and ExitOff for a fenced one.
const (
	ExitOK    = 0
	ExitError = 1
	ExitOff   = 2
)

// Args are the agent's parameters, from standard input or the command line.
type Args struct {
	Action string
	// Plug is the client to fence: an address, CIDR or certificate name.
	Plug string
	// Export limits the fence to one export; empty means all.
	Export string
	// Servers are the storage boxes to fence the client off, reached over
	// ssh as root; empty means this box, through its control socket.
	Servers []string
	// Control is the control socket path on each box.
	Control string
}

// ParseArgs reads key=value lines, skipping blanks and # comments. Unknown
// keys are ignored, as fence-agents do, so Pacemaker's own (nodename, …)
// pass through; "port" is an alias of "plug" and "option" of "action".
func ParseArgs(r io.Reader) (Args, error) {
	a := Args{Action: "reboot", Control: control.DefaultPath}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return a, fmt.Errorf("line %q is not key=value", line)
		}
		switch v = strings.TrimSpace(v); strings.TrimSpace(k) {
		case "action", "option":
			a.Action = v
		case "plug", "port":
			a.Plug = v
		case "export":
			a.Export = v
		case "servers":
			a.Servers = nil
			for _, s := range strings.Split(v, ",") {
				if s = strings.TrimSpace(s); s != "" {
					a.Servers = append(a.Servers, s)
				}
			}
		case "control":
			a.Control = v
		}
	}
	return a, sc.Err()
}

// Box is one storage box the agent acts on.
type Box interface {
	Name() string
	Fence(ctx context.Context, client, export string) error
	Unfence(ctx context.Context, client, export string) error
	Fences(ctx context.Context) ([]server.Fence, error)
	Status(ctx context.Context) (control.Status, error)
}

// Run performs a.Action on every box, writing what the protocol wants to
// out and diagnostics to errOut, and returns the exit code.
func Run(ctx context.Context, a Args, boxes []Box, out, errOut io.Writer) int {
	needsPlug := slices.Contains([]string{"off", "on", "reboot", "status"}, a.Action)
	if needsPlug && a.Plug == "" {
		fmt.Fprintf(errOut, "fence_lvnbd: action %s needs plug=CLIENT (the host's storage address or certificate name)\n", a.Action)
		return ExitError
	}
	if needsPlug {
		// Before any box: a plug no client can match would "fence" nothing
		// on each of them and report success. The boxes check what only
		// they know (a certificate name needs their client CA).
		if err := server.ValidateFenceClient(a.Plug); err != nil {
			fmt.Fprintf(errOut, "fence_lvnbd: plug: %v\n", err)
			return ExitError
		}
	}
	failed := false
	lifted := 0 // boxes where "on" lifted a fence
	each := func(f func(Box) error) {
		for _, b := range boxes {
			if err := f(b); err != nil {
				fmt.Fprintf(errOut, "fence_lvnbd: %s: %v\n", b.Name(), err)
				failed = true
			}
		}
	}
	switch a.Action {
	case "metadata":
		io.WriteString(out, metadata)
		return ExitOK
	case "off", "reboot":
		// Storage fencing cannot power a host back on: reboot fences, and
		// the host is let back in by unfencing ("on") when it rejoins.
		each(func(b Box) error { return b.Fence(ctx, a.Plug, a.Export) })
	case "on":
		each(func(b Box) error {
			err := b.Unfence(ctx, a.Plug, a.Export)
			if errors.Is(err, errNotFenced) {
				return nil
			}
			if err == nil {
				lifted++
			}
			return err
		})
	case "status":
		// OFF only if every box fences the host: on a box that does not,
		// it can still write.
		fencedOn := 0
		each(func(b Box) error {
			list, err := b.Fences(ctx)
			if slices.ContainsFunc(list, func(f server.Fence) bool {
				return server.SameFenceClient(f.Client, a.Plug) && (f.Export == "" || f.Export == a.Export)
			}) {
				fencedOn++
			}
			return err
		})
		if failed {
			return ExitError
		}
		if fencedOn == len(boxes) {
			fmt.Fprintln(out, "Status: OFF")
			return ExitOff
		}
		if fencedOn > 0 {
			fmt.Fprintf(errOut, "fence_lvnbd: %s is fenced on %d of %d boxes only\n", a.Plug, fencedOn, len(boxes))
		}
		fmt.Fprintln(out, "Status: ON")
		return ExitOK
	case "monitor":
		each(func(b Box) error { _, err := b.Status(ctx); return err })
	case "list":
		seen := map[string]bool{}
		each(func(b Box) error {
			st, err := b.Status(ctx)
			for _, e := range st.Exports {
				for _, c := range e.Clients {
					host := c.Peer
					if i := strings.LastIndex(host, ":"); i > 0 {
						host = strings.Trim(host[:i], "[]")
					}
					if !seen[host] {
						seen[host] = true
						fmt.Fprintf(out, "%s,\n", host)
					}
				}
			}
			return err
		})
	default:
		fmt.Fprintf(errOut, "fence_lvnbd: unknown action %q (want off, on, reboot, status, monitor, list or metadata)\n", a.Action)
		return ExitError
	}
	if failed {
		return ExitError
	}
	// As fence-agents do (Success: Powered OFF): an admin running the
	// agent by hand sees what was done.
	switch a.Action {
	case "off", "reboot":
		fmt.Fprintf(out, "Success: %s fenced off %s on %d box(es)\n", a.Plug, server.FenceScope(a.Export), len(boxes))
	case "on":
		fmt.Fprintf(out, "Success: %s unfenced on %s on %d of %d box(es) (not fenced on the others)\n",
			a.Plug, server.FenceScope(a.Export), lifted, len(boxes))
	}
	return ExitOK
}

var errNotFenced = errors.New("not fenced")

// Boxes returns the boxes a names: ssh to each of a.Servers, or the local
// control socket.
func Boxes(a Args) []Box {
	if len(a.Servers) == 0 {
		return []Box{&localBox{c: control.NewClient(a.Control)}}
	}
	var out []Box
	for _, s := range a.Servers {
		out = append(out, &sshBox{host: s, control: a.Control, r: execRunner{}})
	}
	return out
}

type localBox struct{ c *control.Client }

func (b *localBox) Name() string { return "this box (" + b.c.Path() + ")" }
func (b *localBox) Fence(ctx context.Context, client, export string) error {
	_, err := b.c.Fence(ctx, client, export)
	return err
}
func (b *localBox) Unfence(ctx context.Context, client, export string) error {
	err := b.c.Unfence(ctx, client, export)
	if errors.Is(err, volume.ErrNotFound) {
		return errNotFenced
	}
	return err
}
func (b *localBox) Fences(ctx context.Context) ([]server.Fence, error) { return b.c.Fences(ctx) }
func (b *localBox) Status(ctx context.Context) (control.Status, error) { return b.c.Status(ctx) }

// runner runs a command and returns its combined output.
type runner interface {
	run(ctx context.Context, name string, args ...string) ([]byte, error)
}

type execRunner struct{}

func (execRunner) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("running %q: %w\n%s", append([]string{name}, args...), err, out)
	}
	return out, nil
}

// sshBox runs lvnbd on a storage box over ssh, as root, non-interactively:
// the control socket is local to each box by design.
type sshBox struct {
	host, control string
	r             runner
}

func (b *sshBox) Name() string { return b.host }

func (b *sshBox) run(ctx context.Context, args ...string) ([]byte, error) {
	// ssh hands the remote side one line for its shell, not arguments:
	// each is quoted, so a plug or path is one word and nothing more.
	remote := []string{shellQuote("lvnbd")}
	for _, a := range slices.Concat(args, []string{"--control", b.control}) {
		remote = append(remote, shellQuote(a))
	}
	return b.r.run(ctx, "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "root@"+b.host,
		strings.Join(remote, " "))
}

// shellQuote makes s one word for a POSIX shell, quoted only if it needs
// to be.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@%+=:,./_-") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func exportArgs(export string) []string {
	if export == "" {
		return nil
	}
	return []string{"--export", export}
}

func (b *sshBox) Fence(ctx context.Context, client, export string) error {
	_, err := b.run(ctx, append([]string{"fence", client}, exportArgs(export)...)...)
	return err
}

func (b *sshBox) Unfence(ctx context.Context, client, export string) error {
	// Asked first, not read from an error message: "on" for a host that
	// is not fenced succeeds.
	list, err := b.Fences(ctx)
	if err != nil {
		return err
	}
	if !slices.ContainsFunc(list, func(f server.Fence) bool { return server.SameFenceClient(f.Client, client) && f.Export == export }) {
		return errNotFenced
	}
	_, err = b.run(ctx, append([]string{"unfence", client}, exportArgs(export)...)...)
	return err
}

func (b *sshBox) Fences(ctx context.Context) ([]server.Fence, error) {
	out, err := b.run(ctx, "fence", "--list", "--json")
	if err != nil {
		return nil, err
	}
	var list []server.Fence
	return list, json.Unmarshal(out, &list)
}

func (b *sshBox) Status(ctx context.Context) (control.Status, error) {
	out, err := b.run(ctx, "status", "--json")
	if err != nil {
		return control.Status{}, err
	}
	var st control.Status
	return st, json.Unmarshal(out, &st)
}

const metadata = `<?xml version="1.0" ?>
<resource-agent name="fence_lvnbd" shortdesc="Fence a host off lvnbd storage boxes">
<longdesc>fence_lvnbd cuts a hypervisor host off the NBD exports of lvnbd storage boxes (storage fencing, like fence_gnbd). off and reboot fence the host on every box; on unfences it. Fences survive storage box restarts.</longdesc>
<vendor-url>https://github.com/lvnbd/lvnbd</vendor-url>
<parameters>
	<parameter name="action" unique="0" required="1">
		<getopt mixed="-o, --action=[action]" />
		<content type="string" default="reboot" />
		<shortdesc lang="en">Fencing action</shortdesc>
	</parameter>
	<parameter name="plug" unique="0" required="1" obsoletes="port">
		<getopt mixed="-n, --plug=[client]" />
		<content type="string" />
		<shortdesc lang="en">The host to fence: its storage-network address, CIDR or client certificate name</shortdesc>
	</parameter>
	<parameter name="servers" unique="0" required="0">
		<getopt mixed="--servers=[host,host]" />
		<content type="string" />
		<shortdesc lang="en">Storage boxes to fence the host off, reached with ssh as root; empty means this box</shortdesc>
	</parameter>
	<parameter name="export" unique="0" required="0">
		<getopt mixed="--export=[name]" />
		<content type="string" />
		<shortdesc lang="en">Fence off this export only</shortdesc>
	</parameter>
	<parameter name="control" unique="0" required="0">
		<getopt mixed="--control=[path]" />
		<content type="string" default="/run/lvnbd/control.sock" />
		<shortdesc lang="en">Control socket path on each box</shortdesc>
	</parameter>
</parameters>
<actions>
	<action name="on" automatic="0"/>
	<action name="off" />
	<action name="reboot" />
	<action name="status" />
	<action name="list" />
	<action name="monitor" />
	<action name="metadata" />
</actions>
</resource-agent>
`
