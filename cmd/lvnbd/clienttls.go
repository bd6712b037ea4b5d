package main

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/internal/tlscrl"
)

// clientTLS is the TLS of the commands that speak NBD themselves (info,
// bench) to nbds:// URIs: the files named by --tls-ca, --tls-cert,
// --tls-key and --tls-crl. The URI's tls-certificates=DIR (libnbd's layout)
// is the other way to name them.
type clientTLS struct{ ca, cert, key, crl string }

func (c *clientTLS) addFlags(f *pflag.FlagSet) {
	f.StringVar(&c.ca, "tls-ca", "", "nbds:// URIs: the CA (PEM `FILE`) that signed the server's certificate (default: the system's roots)")
	f.StringVar(&c.cert, "tls-cert", "", "nbds:// URIs: a client certificate (PEM `FILE`), for servers that ask for one")
	f.StringVar(&c.key, "tls-key", "", "nbds:// URIs: the client certificate's private key (PEM `FILE`)")
	f.StringVar(&c.crl, "tls-crl", "", "nbds:// URIs: a CRL (PEM `FILE`) of server certificates to refuse")
}

// given reports whether any of the flags was.
func (c *clientTLS) given() bool { return c.ca != "" || c.cert != "" || c.key != "" || c.crl != "" }

// options returns the client options the flags make for uris: nil
// without any. The flags are for nbds:// URIs that do not name their
// certificates themselves. What the CRL cannot do is warned of on warn.
func (c *clientTLS) options(warn io.Writer, uris ...string) (*client.Options, error) {
	if !c.given() {
		return nil, nil
	}
	for _, uri := range uris {
		u, err := client.ParseURI(uri)
		switch {
		case err != nil:
			return nil, err
		case !u.IsTLS():
			return nil, fmt.Errorf("--tls-ca, --tls-cert, --tls-key and --tls-crl are for nbds:// URIs, and %s is plain text: write nbds:// for TLS, or leave them out", uri)
		case u.TLSCertificates != "" && c.crl != "":
			return nil, fmt.Errorf("%s names its certificates (tls-certificates=%s): put the CRL there as %s/ca-crl.pem "+
				"instead of --tls-crl", uri, u.TLSCertificates, u.TLSCertificates)
		case u.TLSVerifyPeer == "0" && c.crl != "":
			return nil, fmt.Errorf("%s does not verify the server's certificate (tls-verify-peer=0), so --tls-crl could "+
				"refuse nothing: leave one of them out", uri)
		case u.TLSCertificates != "":
			return nil, fmt.Errorf("%s names its certificates (tls-certificates=%s): give them either so or with --tls-ca, --tls-cert, --tls-key and --tls-crl, not both", uri, u.TLSCertificates)
		}
	}
	cfg, err := client.LoadTLSConfig(c.ca, c.cert, c.key)
	if err != nil {
		return nil, fmt.Errorf("--tls-ca/--tls-cert/--tls-key: %w", err)
	}
	if c.crl != "" {
		var cas []*x509.Certificate
		if c.ca != "" {
			data, err := os.ReadFile(c.ca)
			if err != nil {
				return nil, fmt.Errorf("--tls-ca: %w", err)
			}
			cas = tlscrl.CertificatesIn(data)
		}
		crl, err := tlscrl.Load(c.crl, "server", cas)
		if err != nil {
			return nil, fmt.Errorf("--tls-crl: %w", err)
		}
		for _, w := range crl.Warnings {
			fmt.Fprintf(warn, "lvnbd: warning: %s\n", w)
		}
		cfg.VerifyConnection = crl.Check
	}
	return &client.Options{TLS: cfg}, nil
}

// clientTLSHelp is what info's and bench's --help say about nbds:// URIs.
const clientTLSHelp = `nbds://HOST[:PORT]/EXPORT (and nbds+unix://) starts TLS before anything else
and never falls back to plain text. The server's certificate is checked
against --tls-ca (default: the system's roots) for the URI's host, or for its
tls-hostname=NAME; --tls-cert and --tls-key give a client certificate for
servers that ask for one, and --tls-crl a CRL whose server certificates are
refused. The URI's tls-certificates=DIR names them all at once, in the layout
nbdinfo and qemu read (DIR/ca-cert.pem, DIR/client-cert.pem with
DIR/client-key.pem, and DIR/ca-crl.pem); tls-verify-peer=0 skips the check
of the server's certificate.`

// dialHint adds the likely cause and its fix to a failed connection.
func dialHint(err error) error {
	var (
		de        *client.DialError
		authority x509.UnknownAuthorityError
		hostname  x509.HostnameError
	)
	switch {
	case errors.As(err, &de) && (errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)):
		return fmt.Errorf("%w — is lvnbd serve running?", err)
	case errors.As(err, &authority):
		return fmt.Errorf("%w — give the CA that signed the server's certificate: --tls-ca FILE, or tls-certificates=DIR in the URI", err)
	case errors.As(err, &hostname):
		return fmt.Errorf("%w — the server's certificate does not name %s: connect by a name it has, or give one with tls-hostname=NAME in the URI", err, hostname.Host)
	case errors.Is(err, client.ErrTLSNoClientCertificate):
		return fmt.Errorf("%w — give one: --tls-cert FILE --tls-key FILE, or tls-certificates=DIR in the URI", err)
	case errors.Is(err, client.ErrTLSRefused):
		return fmt.Errorf("%w — it has no TLS to offer: use nbd:// if plain text will do, or give the server a certificate (lvnbd serve --tls-cert, --tls-key)", err)
	}
	return err
}
