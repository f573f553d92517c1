// A real OpenID Connect provider for the sign-in tests.
// Usage: node provider.mjs <port> <redirect_uri> <folder for the signing keys>
// Writes signing-key.pem (the key it signs ID tokens with, kid "test-key") and forged-key.pem
// (a key it does not publish), then prints "ready".
import Provider from 'oidc-provider';
import { createPrivateKey, generateKeyPairSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';

// Only the 'ready' line goes to stdout (the test stops reading it after that); logs go to stderr.
console.log = console.error;
console.info = console.error;

const [port, redirectUri, keyDir] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;

// Keys come out of generation as PEM text, and the JWK is exported from a key object read
// back from that text: exporting straight from a freshly generated key object can deadlock
// Node 20 (a garbage collection during the export frees the generation job, which takes a
// lock the export holds), and the provider then never starts.
const pem = () => generateKeyPairSync('rsa', {
  modulusLength: 2048,
  publicKeyEncoding: { type: 'spki', format: 'pem' },
  privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
}).privateKey;
const signingPem = pem();
const forgedPem = pem();
writeFileSync(`${keyDir}/signing-key.pem`, signingPem);
writeFileSync(`${keyDir}/forged-key.pem`, forgedPem);
const jwk = { ...createPrivateKey(signingPem).export({ format: 'jwk' }), kid: 'test-key', alg: 'RS256', use: 'sig' };

// Accounts: the login name is the account id; any password is accepted (development interactions).
const accounts = {
  rhea: { email: 'rhea@uni.test', name: 'Rhea Researcher', consilium_roles: ['researcher'] },
  carl: { email: 'carl@north.test', name: 'Carl Custodian', consilium_roles: ['custodian'] },
  nora: { email: 'nora@uni.test', name: 'Nora No-Roles' },
};

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'consilium',
    client_secret: 'test-secret-that-is-long-enough',
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  jwks: { keys: [jwk] },
  pkce: { required: () => true },
  claims: { openid: ['sub'], email: ['email'], profile: ['name', 'consilium_roles'] },
  conformIdTokenClaims: false,
  findAccount: async (ctx, id) => ({
    accountId: id,
    async claims() {
      return { sub: id, ...(accounts[id] ?? { email: `${id}@example.test` }) };
    },
  }),
  features: { devInteractions: { enabled: true } },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.listen(Number(port), '127.0.0.1', () => process.stdout.write('ready\n'));
