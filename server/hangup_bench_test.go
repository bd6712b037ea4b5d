package server

import (
	"net"
	"testing"
)

// BenchmarkPeerHungUp is the price of the look every write, or every batch of
// the reader's small writes, takes at its connection (see hangup.go): one
// poll(2), about 1.5 µs on the development machine, where getppid(2) takes 1.1.
func BenchmarkPeerHungUp(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	cl, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	sv, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer sv.Close()
	c := &conn{sock: socketOf(sv)}
	b.ReportAllocs()
	for b.Loop() {
		if c.peerHungUp() {
			b.Fatal("hung up")
		}
	}
}
