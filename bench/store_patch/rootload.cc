// Loads client roots into an X509_STORE the way grpc-core does (x509_store_load_certs in
// src/core/tsi/ssl_transport_security.cc: PEM_read_bio_X509_AUX, then X509_STORE_add_cert one
// by one, with PARTIAL_CHAIN | TRUSTED_FIRST), times the load, then checks the store: every
// sampled root must verify, and the stranger certificate must not.
//
// Usage: rootload ROOTS.pem STRANGER.pem  ->  one JSON line; exit 1 on a wrong verdict.
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static std::string slurp(const char *path) {
  std::ifstream file(path);
  std::stringstream out;
  out << file.rdbuf();
  return out.str();
}

static std::vector<X509 *> parse(const std::string &pem) {
  std::vector<X509 *> out;
  BIO *bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  while (X509 *cert = PEM_read_bio_X509_AUX(bio, nullptr, nullptr, nullptr)) {
    out.push_back(cert);
  }
  ERR_clear_error();
  BIO_free(bio);
  return out;
}

static bool verifies(X509_STORE *store, X509 *leaf) {
  X509_STORE_CTX *ctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(ctx, store, leaf, nullptr);
  bool ok = X509_verify_cert(ctx) == 1;
  X509_STORE_CTX_free(ctx);
  return ok;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: rootload ROOTS.pem STRANGER.pem\n");
    return 2;
  }
  const std::string roots = slurp(argv[1]);
  const auto start = std::chrono::steady_clock::now();
  X509_STORE *store = X509_STORE_new();
  X509_STORE_set_flags(store, X509_V_FLAG_PARTIAL_CHAIN | X509_V_FLAG_TRUSTED_FIRST);
  BIO *pem = BIO_new_mem_buf(roots.data(), static_cast<int>(roots.size()));
  size_t loaded = 0;
  while (X509 *root = PEM_read_bio_X509_AUX(pem, nullptr, nullptr, nullptr)) {
    if (!X509_STORE_add_cert(store, root)) {
      fprintf(stderr, "X509_STORE_add_cert failed\n");
      return 1;
    }
    X509_free(root);
    loaded++;
  }
  ERR_clear_error();
  BIO_free(pem);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const std::vector<X509 *> all = parse(roots);
  const size_t step = all.size() / 100 + 1;  // about 100 samples, all of a small file
  size_t sampled = 0, verified = 0;
  for (size_t i = 0; i < all.size(); i += step, sampled++) {
    verified += verifies(store, all[i]);
  }
  const std::vector<X509 *> stranger = parse(slurp(argv[2]));
  const bool stranger_in = !stranger.empty() && verifies(store, stranger[0]);
  printf("{\"roots\": %zu, \"load_s\": %.4f, \"sampled\": %zu, \"verified\": %zu, "
         "\"stranger_verified\": %s}\n",
         loaded, seconds, sampled, verified, stranger_in ? "true" : "false");
  return verified == sampled && !stranger.empty() && !stranger_in ? 0 : 1;
}
