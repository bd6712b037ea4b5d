// Command lvnbd is a network block storage server and client for Linux
// clusters: it exports LVM volumes and files over NBD and attaches them as
// kernel block devices. See `lvnbd --help`.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// SIGINT and SIGTERM cancel the context: every command treats that as
	// a normal, orderly exit.
	ctx, stop := interruptContext(context.Background())
	defer stop()
	cmd := newRootCmd(os.Stdout, os.Stderr)
	if err := cmd.ExecuteContext(ctx); err != nil {
		var code exitCode
		if errors.As(err, &code) {
			os.Exit(int(code)) // the command already said why
		}
		fmt.Fprintln(os.Stderr, "lvnbd:", err)
		os.Exit(1)
	}
}

// interruptContext returns a context cancelled by the first SIGINT or
// SIGTERM. The signals are caught only until then: a second one kills the
// process at once, for when the orderly exit the first began hangs. stop
// cancels ctx and releases the signals.
func interruptContext(parent context.Context) (ctx context.Context, stop func()) {
	ctx, cancel := context.WithCancel(parent)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-sigs:
			// Before the cancel, so that whoever sees ctx done can
			// count on the next signal's default action.
			signal.Stop(sigs)
			cancel()
		case <-ctx.Done():
			signal.Stop(sigs)
		}
	}()
	return ctx, func() { cancel(); <-done }
}

// exitCode is returned by commands whose exit status carries meaning beyond
// failure (the fence agent's "fenced" is 2) and who printed their own message.
type exitCode int

func (c exitCode) Error() string { return fmt.Sprintf("exit status %d", int(c)) }
