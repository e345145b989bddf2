// Login page: after a failed attempt the name is kept, so focus goes to the password field,
// whose description (the error) a screen reader reads out with it.
const error = document.getElementById("login-error");
const username = document.getElementById("username");
const password = document.getElementById("password");
if (error && !error.classList.contains("hidden") && error.textContent.trim()) {
  (username.value ? password : username).focus();
}
// Typing again clears the "invalid" state the last attempt left.
for (const field of [username, password]) {
  field.addEventListener("input", () => {
    username.setAttribute("aria-invalid", "false");
    password.setAttribute("aria-invalid", "false");
  });
}
