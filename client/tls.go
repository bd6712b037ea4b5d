package client

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/lvnbd/lvnbd/internal/tlscrl"
	"github.com/lvnbd/lvnbd/nbd"
)

// TLS for nbds:// and nbds+unix:// URIs (doc/proto.md, "TLS support"): the
// client asks for NBD_OPT_STARTTLS before any other option, and a server
// that refuses ends the attempt. An nbds URI never falls back to plain text
// (doc/uri.md), and the client never starts TLS for an nbd:// one.

// The files of a tls-certificates directory: GnuTLS's layout, which libnbd
// and qemu read, and in which lvnbd's tests write their certificates.
const (
	tlsDirCA         = "ca-cert.pem"
	tlsDirCRL        = "ca-crl.pem" // optional: certificates the CA revoked
	tlsDirClientCert = "client-cert.pem"
	tlsDirClientKey  = "client-key.pem"
)

// LoadTLSConfig reads the PEM files a client's TLS uses: the CA that signed
// the server's certificate ("" trusts the system's roots) and a client
// certificate with its key (both or neither), for servers that ask for one.
func LoadTLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("reading the TLS CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("TLS CA %s holds no PEM certificate", caFile)
		}
		cfg.RootCAs = pool
	}
	switch {
	case certFile != "" && keyFile != "":
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("loading the TLS client certificate %s with key %s: %w", certFile, keyFile, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	case certFile != "":
		return nil, fmt.Errorf("TLS client certificate %s has no key file: give both", certFile)
	case keyFile != "":
		return nil, fmt.Errorf("TLS client key %s has no certificate file: give both", keyFile)
	}
	return cfg, nil
}

// loadTLSDir reads a tls-certificates directory: its CA must be there, its
// client certificate and key may be.
func loadTLSDir(dir string) (*tls.Config, error) {
	ca := filepath.Join(dir, tlsDirCA)
	if _, err := os.Stat(ca); err != nil {
		return nil, fmt.Errorf("tls-certificates=%s: %w (the directory must hold %s, the CA that signed the server's certificate)", dir, err, tlsDirCA)
	}
	cert, key := filepath.Join(dir, tlsDirClientCert), filepath.Join(dir, tlsDirClientKey)
	_, certErr := os.Stat(cert)
	_, keyErr := os.Stat(key)
	switch {
	case certErr == nil && keyErr == nil:
	case errors.Is(certErr, fs.ErrNotExist) && errors.Is(keyErr, fs.ErrNotExist):
		cert, key = "", "" // no client certificate
	case certErr != nil && !errors.Is(certErr, fs.ErrNotExist):
		return nil, fmt.Errorf("tls-certificates=%s: %w", dir, certErr)
	case keyErr != nil && !errors.Is(keyErr, fs.ErrNotExist):
		return nil, fmt.Errorf("tls-certificates=%s: %w", dir, keyErr)
	case certErr != nil:
		return nil, fmt.Errorf("tls-certificates=%s holds %s but not %s: give both or neither", dir, tlsDirClientKey, tlsDirClientCert)
	default:
		return nil, fmt.Errorf("tls-certificates=%s holds %s but not %s: give both or neither", dir, tlsDirClientCert, tlsDirClientKey)
	}
	cfg, err := LoadTLSConfig(ca, cert, key)
	if err != nil {
		return nil, fmt.Errorf("tls-certificates=%s: %w", dir, err)
	}
	// GnuTLS's clients (qemu) refuse a server certificate the directory's
	// CRL revokes: so must a URI that works for them.
	crl := filepath.Join(dir, tlsDirCRL)
	switch pem, err := os.ReadFile(crl); {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("tls-certificates=%s: %w", dir, err)
	default:
		// Its warnings (a stale list, an intermediate's) have no log
		// here; lvnbd info and bench name the file with --tls-crl.
		list, err := tlscrl.Parse(crl, pem, "server", tlsDirCAs(ca), time.Now())
		if err != nil {
			return nil, fmt.Errorf("tls-certificates=%s: %w", dir, err)
		}
		cfg.VerifyConnection = list.Check
	}
	return cfg, nil
}

// tlsDirCAs are the certificates of a directory's CA file, which its CRL
// is checked against (none if it cannot be read: LoadTLSConfig read it).
func tlsDirCAs(path string) []*x509.Certificate {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	return tlscrl.CertificatesIn(data)
}

// tlsConfigFor returns the TLS configuration for dialing u, or nil for a
// plain-text URI: opts.TLS or the URI's tls-certificates directory (one of
// them) for the roots and the client certificate, the URI's tls-hostname or
// host for the name the server's certificate must carry, and its
// tls-verify-peer=0 to skip that check.
func tlsConfigFor(u URI, opts *Options) (*tls.Config, error) {
	given := opts != nil && opts.TLS != nil
	if !u.IsTLS() {
		param := ""
		switch {
		case u.TLSCertificates != "":
			param = "tls-certificates"
		case u.TLSHostname != "":
			param = "tls-hostname"
		case u.TLSVerifyPeer != "":
			param = "tls-verify-peer"
		case u.TLSType != "":
			param = "tls-type"
		}
		if given || param != "" {
			what := "TLS settings were given"
			if param != "" {
				what = "it has " + param
			}
			return nil, fmt.Errorf("%s is a plain-text URI, yet %s: write nbds:// (or nbds+unix://) for TLS", u, what)
		}
		return nil, nil
	}
	switch u.TLSType {
	case "", "x509":
	default:
		return nil, fmt.Errorf("%s: tls-type=%s: %w (lvnbd speaks X.509 TLS only: leave tls-type out or write tls-type=x509)", u, u.TLSType, ErrTLSNotSupported)
	}
	var cfg *tls.Config
	switch {
	case u.TLSCertificates != "" && given:
		return nil, fmt.Errorf("%s names its certificates (tls-certificates=%s), and others were given too: give one or the other", u, u.TLSCertificates)
	case u.TLSCertificates != "":
		var err error
		if cfg, err = loadTLSDir(u.TLSCertificates); err != nil {
			return nil, err
		}
	case given:
		cfg = opts.TLS.Clone()
	default:
		cfg = &tls.Config{MinVersion: tls.VersionTLS12} // the system's roots
	}
	// What the server's certificate is checked for comes from the URI
	// alone: a configuration shared by the URIs of several servers must not
	// take one server's certificate for another's.
	cfg.ServerName = u.TLSHostname
	if cfg.ServerName == "" {
		cfg.ServerName, _, _ = strings.Cut(u.Host, "%") // an IPv6 zone is no part of a certificate
	}
	// Skipped only when the URI asks for it (doc/uri.md): encryption
	// without knowing who is at the other end.
	cfg.InsecureSkipVerify = u.TLSVerifyPeer == "0"
	if !cfg.InsecureSkipVerify && cfg.ServerName == "" {
		return nil, fmt.Errorf("%s: a Unix socket has no host name to check the server's certificate against: add tls-hostname=NAME (a name in its certificate) or tls-verify-peer=0", u)
	}
	return cfg, nil
}

// startTLS asks for TLS (NBD_OPT_STARTTLS) and runs the TLS handshake; from
// then on the rest of the handshake and the transmission go over n.nc,
// encrypted. It must come before any other option: what was said in plain
// text before it could have been tampered with.
func (n *negotiator) startTLS() error {
	if !n.fixed {
		return fmt.Errorf("%s cannot start TLS: %w: it speaks only the old newstyle NBD handshake, which has no NBD_OPT_STARTTLS", n.server, ErrTLSRefused)
	}
	if err := n.send(nbd.OptStartTLS, nil); err != nil {
		return err
	}
	t, data, err := n.recv(nbd.OptStartTLS)
	switch {
	case err != nil:
		return err
	case t.IsError():
		return n.abortWith(n.optionError(nbd.OptStartTLS, t, data))
	case t != nbd.RepAck:
		return protocolErrorf("%s answered NBD_OPT_STARTTLS with %v", n.server, t)
	case len(data) != 0:
		return protocolErrorf("%s acknowledged NBD_OPT_STARTTLS with %d bytes of data, where the spec has none", n.server, len(data))
	}
	tc := tls.Client(n.nc, n.tls)
	// The deadline watchContext set on the socket bounds this too.
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake with %s: %w", n.server, err)
	}
	n.nc, n.tlsStarted = tc, true
	return nil
}
